"""hpo-meta as a user gets it: the wheel ships the policies, the sdist the whole test suite, and the
packages import only what the package declares."""

from __future__ import annotations

import ast
import base64
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hpo_env", "agents", "training")
# What git ignores, and the checkout's own folders a build must not see.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "runs", "results", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", ".whl", ".gl"
)


def _build(source: Path, out: Path, *kinds: str) -> list[Path]:
    """Build with setuptools' PEP 517 hooks in a fresh process (as pip does), in ``source``: without a
    deprecation warning, since setuptools turns those into errors at a date it names (the TOML-table
    license: 2027-02-18), and pip builds with the newest setuptools."""
    hooks = "; ".join(f"print('built:', b.build_{kind}(out))" for kind in kinds)  # (a hook rewrites sys.argv)
    script = f"import sys; from setuptools import build_meta as b; out = sys.argv[1]; {hooks}"
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DeprecationWarning" not in done.stderr, done.stderr[-3000:]
    return [out / line.split()[-1] for line in done.stdout.splitlines() if line.startswith("built: ")]


def _wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if ".dist-info/" not in name}


@pytest.fixture(scope="module")
def distributions(tmp_path_factory) -> dict[str, Path]:
    """The sdist and wheel built from a copy of the checkout, and a wheel built from the unpacked sdist."""
    setuptools = pytest.importorskip("setuptools")
    needed = re.search(r'requires = \["setuptools>=(\d+)', (ROOT / "pyproject.toml").read_text())
    assert needed, "[build-system] requires names no setuptools version"
    if int(setuptools.__version__.split(".")[0]) < int(needed.group(1)):
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build needs (>= {needed.group(1)})")
    tmp = tmp_path_factory.mktemp("dist")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    sdist, wheel = _build(source, tmp, "sdist", "wheel")
    with tarfile.open(sdist) as archive:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # (Python >= 3.11.4)
        archive.extractall(tmp / "unpacked", **safe)
    (unpacked,) = (tmp / "unpacked").iterdir()
    (tmp / "from_sdist").mkdir()
    (wheel_from_sdist,) = _build(unpacked, tmp / "from_sdist", "wheel")
    return {"source": source, "sdist": unpacked, "wheel": wheel, "wheel_from_sdist": wheel_from_sdist}


def test_the_wheel_ships_the_policies_and_only_the_packages(distributions):
    files = _wheel_files(distributions["wheel"])
    assert {name.split("/")[0] for name in files} == set(PACKAGES)
    source = distributions["source"]
    shipped = {p.relative_to(source).as_posix() for p in (source / "agents" / "policies").rglob("*") if p.is_file()}
    assert {"agents/policies/default/model.zip", "agents/policies/default/config.json"} <= shipped
    assert shipped - files == set(), "policy files the wheel leaves out: add them to [tool.setuptools.package-data]"
    for package in PACKAGES:
        assert f"{package}/py.typed" in files


def test_the_sdist_holds_what_the_tests_run(distributions):
    """Unpacked, the sdist runs its tests as the repository does: conftest.py, and the examples and
    benchmark scripts the tests load, come with them."""
    source, sdist = distributions["source"], distributions["sdist"]
    for folder in ("tests", "examples", "benchmarks", "scripts"):
        wanted = {p.relative_to(source) for p in (source / folder).rglob("*") if p.is_file()}
        missing = sorted(str(p) for p in wanted if not (sdist / p).is_file())
        assert not missing, f"the sdist leaves out {missing}: see MANIFEST.in"
    assert (sdist / "tests" / "conftest.py").is_file() and (sdist / "constraints.txt").is_file()
    assert _wheel_files(distributions["wheel_from_sdist"]) == _wheel_files(distributions["wheel"])


def _requirement_names(extra: str | None) -> set[str]:
    names = set()
    for requirement in requires("hpo-meta") or []:
        name, _, marker = requirement.partition(";")
        if (extra is None) == ("extra ==" not in marker) and (extra is None or f'"{extra}"' in marker):
            names.add(re.split(r"[\s<>=!~\[]", name.strip(), maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_the_packages_import_only_declared_dependencies():
    """A runtime import of an undeclared package (one only the dev extra brings, such as pytest) fails
    for a user of the wheel; the integrations' libraries are extras, imported only in integrations.py."""
    dependencies = _requirement_names(None)
    # (integrations.py falls back on pytorch_lightning, Lightning's former name, where lightning is absent)
    extras = _requirement_names("lightning") | _requirement_names("hf") | {"pytorch-lightning"}
    if not dependencies:
        pytest.skip("hpo-meta's metadata is not installed")
    distributions_of = packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in stdlib or top in PACKAGES or top == "__future__":
                        continue
                    dists = {d.lower().replace("_", "-") for d in distributions_of.get(top, [top])}
                    allowed = dependencies | (extras if path.name == "integrations.py" else set())
                    if not dists & allowed:
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module} ({sorted(dists)})")
    assert not wrong, "imports of packages hpo-meta does not declare:\n" + "\n".join(wrong)


def test_the_declared_numpy_loads_the_shipped_policies():
    """A policy saved under numpy 2 pickles its spaces with ``numpy._core`` modules, which numpy 1.x
    lacks: there ``from_pretrained("default", ...)`` failed with "No module named 'numpy._core'"."""
    declared = re.search(r'"numpy>=(\d+)', (ROOT / "pyproject.toml").read_text())
    assert declared, "pyproject.toml names no lower bound for numpy"
    needing_numpy_2 = []
    for model in sorted((ROOT / "agents" / "policies").rglob("model.zip")):
        with zipfile.ZipFile(model) as archive:
            data = json.loads(archive.read("data"))
        for key, value in data.items():
            if isinstance(value, dict) and b"numpy._core" in base64.b64decode(value.get(":serialized:", "")):
                needing_numpy_2.append(f"{model.relative_to(ROOT)}: {key}")
    assert needing_numpy_2, "no shipped policy pickles numpy 2's modules: check what this test looks for"
    assert int(declared.group(1)) >= 2, f"these need numpy >= 2 to load: {needing_numpy_2}"
