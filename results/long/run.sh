#!/usr/bin/env bash
# The long preset (attnres train --preset long: d256 x 8, 1500 steps x 2,048 tokens, AdamW 1e-3, 75 warmup
# steps + cosine, 32 eval batches every 100 steps), two 1-thread runs at a time on the 2-core CPU
# (~50 min a pair). Then: python results/long/collect.py
set -euo pipefail
RUNS=${RUNS:-runs/long}
mkdir -p "$RUNS"
pair() {
  for run in "$@"; do
    arm=${run%-*}; seed=${run#*-s}
    python -m attnres train --preset long --residual "$arm" --seed "$seed" --out "$RUNS/$run" --no-progress \
      > "$RUNS/$run.log" 2>&1 &
  done
  wait
}
pair full-s0 standard-s1
pair block-s1 full-s1
