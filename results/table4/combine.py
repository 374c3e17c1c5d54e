"""One Table-4-style table from the two ablate runs of results/table4 (ablations/ and zoo/ share the config,
the seeds and the standard baseline, whose runs are identical in both: checked here), with each row's paired
delta against standard and against Full AttnRes, and the block-size sweep (Fig. 6). Writes tables.md here."""

import json
import math
import statistics
import sys
from pathlib import Path

from attnres.train.ablate import paired_delta

HERE = Path(__file__).resolve().parent
NAMES = {
    "standard": "standard (PreNorm residual)",
    "full": "Full AttnRes",
    "block": "Block AttnRes (N = 8, S = 2)",
    "full:attn_res_query=input_dependent": "Full, input-dependent query",
    "full:attn_res_query=scalar": "Full, input-independent mixing (scalars)",
    "full:attn_res_weights=sigmoid": "Full, sigmoid instead of softmax",
    "full:attn_res_key_norm=false": "Full, no key RMSNorm",
    "full:attn_res_window=4": "Full, sliding window (embedding + 4)",
    "block:attn_res_heads=4": "Block, multihead (H = 4)",
    "denseformer": "DenseFormer (DWA)",
    "mhc": "mHC (n = 4, Sinkhorn)",
    "mhc_lite": "mHC-lite (n = 4, Birkhoff)",
    "residual_scale": "misreading: learnable residual scale (LayerScale)",
    "realformer": "misreading: RealFormer (residual attention scores)",
    "depth_mha": "misreading: QKV multi-head attention over depth",
}
SWEEP = [("full", 1), ("block", 2), ("block:attn_res_block_size=4", 4), ("block:attn_res_block_size=8", 8),
         ("block:attn_res_block_size=16", 16)]


def load(dirs) -> dict[str, dict]:
    arms, base = {}, None
    for d in dirs:
        s = json.loads((d / "summary.json").read_text())
        for r in s["arms"]:
            if r["arm"] == "standard" and base is not None:
                assert r["val_loss"] == base, f"the standard runs differ between ablate dirs: {r['val_loss']} {base}"
            base = r["val_loss"] if r["arm"] == "standard" else base
            arms.setdefault(r["arm"], r)
    return arms


def delta(arms, a, b) -> str:
    d = paired_delta(arms[a]["val_loss"], arms[b]["val_loss"])
    if not d["n"]:
        return "-"
    return f"{d['mean']:+.4f} ± {d['half_width']:.4f}" if math.isfinite(d["half_width"]) else f"{d['mean']:+.4f}"


def row(arms, a, label=None) -> str:
    r, s = arms[a], arms["standard"]
    vals = ", ".join(f"{v:.4f}" for v in r["val_loss"])
    mean, sd = statistics.fmean(r["val_loss"]), statistics.stdev(r["val_loss"])
    step = r["step_time_median"] / s["step_time_median"]
    return (f"| {label or NAMES.get(a, a)} | {mean:.4f} ± {sd:.4f} | {vals} | "
            f"{delta(arms, a, 'standard') if a != 'standard' else ''} | "
            f"{delta(arms, a, 'full') if a != 'full' else ''} | "
            f"{r['params']:,} | {r['flops_per_token'] / s['flops_per_token']:.3f} | {step:.2f} |")


HEAD = ("| arm | val loss (mean ± std) | per seed 0, 1, 2 | Δ vs standard (paired, ± 95% t) | Δ vs Full | params "
        "| FLOPs/token ratio | step time ratio (median, shared CPU) |\n|---|---|---|---|---|---|---|---|")


def main(dirs) -> str:
    arms = load(dirs)
    table4 = [a for a in NAMES if a in arms]
    sweep = [(a, s) for a, s in SWEEP if a in arms]
    text = "\n".join([HEAD, *[row(arms, a) for a in table4], "", "Block-size sweep (S sublayers per block, "
                      "N = 16 / S blocks over 8 layers):", "", HEAD,
                      *[row(arms, a, f"S = {s}" + (" (Full)" if s == 1 else "")) for a, s in sweep]]) + "\n"
    (HERE / "tables.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main([Path(p) for p in sys.argv[1:]] or [HERE / "ablations", HERE / "zoo"]))
