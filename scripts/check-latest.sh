#!/usr/bin/env bash
# Install the newest releases pyproject.toml's bounds allow into a separate venv (.venv-latest), run the
# model, generation and training tests against them, and refresh requirements/lock.txt if they pass.
# Then commit the lock (and raise a bound in pyproject.toml only after testing the new release here).
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=.venv-latest
ATTNRES_DEPS=latest bash scripts/setup.sh
echo "check-latest: testing with:"
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(torch|transformers|tokenizers|safetensors|huggingface.hub|numpy) ' | sed 's/^/  /'
"$VENV/bin/ruff" check attnres tests benchmarks scripts
"$VENV/bin/python" -m pytest -q -n 2 tests/models tests/residual tests/train tests/test_cli.py
bash scripts/lock.sh "$VENV"
git --no-pager diff --stat -- requirements/lock.txt
