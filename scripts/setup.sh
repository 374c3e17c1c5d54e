#!/usr/bin/env bash
# Create .venv from nothing and install attnres with its dev tools. Idempotent.
# TORCH_SPEC picks the torch build (default torch==2.13.0; on this project's machines that is a
# local CPU wheel). torch goes in first so no other package pulls a different one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import attnres, torch; print(f'attnres {attnres.__version__} ready (torch {torch.__version__})')"
