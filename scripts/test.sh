#!/usr/bin/env bash
# Lint and run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check attnres tests benchmarks scripts
.venv/bin/python -m pytest -q -n 2 "$@"
# without a GPU, the Triton kernels' tests run on CPU tensors under Triton's interpreter
if [ $# -eq 0 ] && .venv/bin/python -c "import triton, torch; assert not torch.cuda.is_available()" 2>/dev/null; then
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -p no:xdist tests/ops/test_triton_read.py \
        tests/ops/test_two_phase.py -k "triton"
fi
