"""The packages ship ``py.typed``: their annotations are part of the API and are checked like code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_packages_type_check_with_mypy(tmp_path):
    pytest.importorskip("mypy", reason="mypy is in the dev extra (scripts/bootstrap.sh installs it)")
    # pyproject.toml's [tool.mypy] names the packages and the settings; the cache stays out of the checkout.
    # (A subprocess: mypy's own exit skips tearing down its object graph, which in-process takes ~30 s.)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"mypy found type errors (run `.venv/bin/mypy` to see them):\n{done.stdout}{done.stderr}"
    )
    assert "Success: no issues found" in done.stdout
