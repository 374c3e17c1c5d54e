#!/usr/bin/env bash
# Lint and run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check attnres tests benchmarks scripts 2>/dev/null || .venv/bin/ruff check attnres tests
.venv/bin/python -m pytest -q -n 2 "$@"
