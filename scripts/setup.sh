#!/usr/bin/env bash
# Create a venv (default .venv) from nothing and install attnres with its dev tools and the extras
# [upcycle] (gguf, accelerate: `attnres upcycle` of a .gguf / smollm2-135m), [peft] (peft: LoRA) and [eval]
# (lm-eval[hf]: `attnres eval --lm-eval`), all after torch. Idempotent.
#   TORCH_SPEC     the torch build (default torch==2.13.0; on this project's machines a local CPU wheel).
#                  torch goes in first so no other package pulls a different one.
#   ATTNRES_DEPS   "lock" (default): the exact versions of requirements/lock.txt, what CI last passed;
#                  "latest": the newest releases pyproject.toml's bounds allow.
#   VENV           where to install (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
DEPS=${ATTNRES_DEPS:-lock}
case "$DEPS" in lock|latest) ;; *) echo "ATTNRES_DEPS must be 'lock' or 'latest', got '$DEPS'" >&2; exit 2;; esac
pip_install() {  # pip's exit status, without the local index's location warnings
    local log rc=0
    log=$(mktemp)
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
    grep -v "^WARNING: Location" "$log" || true
    rm -f "$log"
    return $rc
}
[ -x "$VENV/bin/python" ] || { echo "setup: creating $VENV"; "$PY" -m venv "$VENV"; }
echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
pip_install "${TORCH_SPEC:-torch==2.13.0}"
if [ "$DEPS" = lock ]; then
    echo "setup: installing the locked dependencies (requirements/lock.txt)"
    pip_install -r requirements/lock.txt
    pip_install --no-deps -e .
else
    echo "setup: installing the newest dependencies the bounds allow (ATTNRES_DEPS=latest)"
    pip_install --upgrade --upgrade-strategy eager -e ".[dev,upcycle,peft,eval]"
fi
"$VENV/bin/python" -m pip check --disable-pip-version-check
echo "setup: building the fused CPU kernel (once per installation, ~30 s)"
"$VENV/bin/python" -c "from attnres.ops import cpu_kernel; cpu_kernel.load()"
"$VENV/bin/python" -c "import attnres, torch; print(f'attnres {attnres.__version__} ready (torch {torch.__version__})')"
