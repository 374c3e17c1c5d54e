#!/usr/bin/env bash
# Write requirements/lock.txt: the exact versions installed in a venv (default .venv) that passed the
# tests, less attnres itself and torch (setup.sh installs torch from TORCH_SPEC). Linux x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
{
    echo "# Exact versions of the last green run (scripts/lock.sh from $VENV on $(date -u +%Y-%m-%d));"
    echo "# torch comes from TORCH_SPEC in scripts/setup.sh. Do not edit by hand."
    "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
        | grep -viE '^(torch|attnres|nvidia-[a-z0-9-]+)(==| @)' | sort -f
} > requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
