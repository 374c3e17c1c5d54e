#!/usr/bin/env bash
# The upcycling study: SmolLM2-135M-Instruct upcycled to standard, Block and Full AttnRes, each evaluated on
# two held-out texts, fine-tuned on the Shakespeare corpus with identical data order, tokens and
# hyperparameters (results/configs/upcycle.yaml), and evaluated again. Outputs under runs/upcycle/ (large:
# checkpoints); results/upcycle-smollm2/collect.py tabulates them. Run from the repository root.
set -euo pipefail
OUT=${OUT:-runs/upcycle}
EVAL=(--seq-len 256 --batch-size 8 --max-batches 6 --json)
export OMP_NUM_THREADS=1
python results/upcycle-smollm2/texts.py "$OUT/texts"
for r in standard block full; do
  [ -d "$OUT/$r-init" ] || attnres upcycle smollm2-135m --residual "$r" --out "$OUT/$r-init"
  for t in shakespeare-val brown; do
    [ -s "$OUT/eval/$r-init-$t.json" ] || { mkdir -p "$OUT/eval"; attnres eval --checkpoint "$OUT/$r-init" \
      --text "$OUT/texts/$t.txt" "${EVAL[@]}" > "$OUT/eval/$r-init-$t.json"; }
  done
  if [ ! -s "$OUT/$r/result.json" ]; then
    resume=(); [ -d "$OUT/$r/checkpoint" ] && resume=(--resume)
    attnres train --init "$OUT/$r-init" --config results/configs/upcycle.yaml --out "$OUT/$r" --no-progress \
      "${resume[@]}"
  fi
  for t in shakespeare-val brown; do
    [ -s "$OUT/eval/$r-tuned-$t.json" ] || attnres eval --checkpoint "$OUT/$r" --text "$OUT/texts/$t.txt" \
      "${EVAL[@]}" > "$OUT/eval/$r-tuned-$t.json"
  done
done
