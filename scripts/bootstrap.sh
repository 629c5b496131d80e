#!/usr/bin/env bash
# Create .venv (if needed) and install hpo-meta with the pinned versions in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    # The pinned versions (numpy 2.4, scikit-learn 1.9, ...) need Python 3.11 or later.
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "bootstrap.sh: $("$PYTHON" --version 2>&1) is too old for the pinned versions in constraints.txt," \
             "which need Python >= 3.11; run with PYTHON=python3.11 (or newer) bash scripts/bootstrap.sh," \
             "or on Python 3.10 install without the pins: pip install -e '.[dev]'" >&2
        exit 1
    fi
    "$PYTHON" -m venv .venv
fi
echo "bootstrap.sh: installing hpo-meta and its pinned dependencies into .venv (about 2 minutes the first time)" >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
