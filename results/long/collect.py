"""The long preset (1500 steps x 2,048 tokens = 3.1M tokens): standard / Block / Full, seeds 0 and 1.

Reads RUNS/<arm>-s<seed>/{metrics.jsonl,run.json} (made by run.sh) and writes, here: tables.md (validation
loss over training, the gaps to standard, Block's share of the Full-standard gap), metrics/ (each run's
metrics.jsonl and run.json: no checkpoints), summary.json and loss.png.

The seed-0 standard and Block runs were measured once, on 2026-12-01, before this directory existed; their
validation losses at steps 100, 800 and 1500 are in issue 11 and are given as PROBE below, marked as quoted
(not rerun: the session that ran the rest had CPU time for four of the six runs).
"""

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ("standard", "block", "full")
SEEDS = (0, 1)
GAP_STEPS = {100, 200, 400, 800, 1200, 1500}
PROBE = {("standard", 0): {100: 5.851, 800: 4.606, 1500: 4.350}, ("block", 0): {100: 5.605, 800: 4.427, 1500: 4.205}}


def val_curve(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def train_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(r.get("step_time", 0.0) for r in rows)


def load(runs: Path) -> tuple[dict, dict]:
    curves, seconds = {}, {}
    for arm in ARMS:
        for seed in SEEDS:
            run = runs / f"{arm}-s{seed}"
            if (run / "metrics.jsonl").exists():
                curves[arm, seed] = val_curve(run)
                seconds[arm, seed] = train_seconds(run)
                dest = HERE / "metrics" / f"{arm}-s{seed}"
                dest.mkdir(parents=True, exist_ok=True)
                for name in ("metrics.jsonl", "run.json"):
                    shutil.copy(run / name, dest / name)
            elif (arm, seed) in PROBE:
                curves[arm, seed] = PROBE[arm, seed]
    return curves, seconds


def fmt(x: float | None, sign: bool = False) -> str:
    return "–" if x is None else (f"{x:+.3f}" if sign else f"{x:.3f}")


def curve_table(curves: dict) -> list[str]:
    steps = sorted({s for c in curves.values() for s in c})
    cols = [(a, s) for s in SEEDS for a in ARMS if (a, s) in curves]
    head = " | ".join(f"{a} s{s}" + (" (quoted)" if (a, s) in PROBE and len(curves[a, s]) == 3 else "")
                      for a, s in cols)
    out = [f"| step | tokens | {head} |", "|" + "---|" * (len(cols) + 2)]
    for st in steps:
        cells = " | ".join(fmt(curves[c].get(st)) for c in cols)
        out.append(f"| {st} | {st * 2048 / 1e6:.2f}M | {cells} |")
    return out


def gap_table(curves: dict) -> tuple[list[str], list[dict]]:
    out = ["| seed | step | Block − standard | Full − standard | Block − Full | Block's gain ÷ Full's gain |",
           "|---|---|---|---|---|---|"]
    rows = []
    for seed in SEEDS:
        std = curves.get(("standard", seed), {})
        for st in sorted(set(std) & GAP_STEPS):
            b, f = curves.get(("block", seed), {}).get(st), curves.get(("full", seed), {}).get(st)
            db = None if b is None else b - std[st]
            df = None if f is None else f - std[st]
            dbf = None if b is None or f is None else b - f
            share = None if db is None or df is None or df >= 0 else db / df
            rows.append(dict(seed=seed, step=st, block_minus_standard=db, full_minus_standard=df,
                             block_minus_full=dbf, block_share_of_full_gap=share))
            out.append(f"| {seed} | {st} | {fmt(db, True)} | {fmt(df, True)} | {fmt(dbf, True)} | "
                       f"{'–' if share is None else f'{share:.2f}'} |")
    return out, rows


def plot(curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(standard="tab:gray", block="tab:blue", full="tab:orange")
    for (arm, seed), c in sorted(curves.items()):
        steps = sorted(c)
        quoted = (arm, seed) in PROBE and len(steps) == len(PROBE[arm, seed])  # three points: markers only
        ax.plot([s * 2048 / 1e6 for s in steps], [c[s] for s in steps], color=colors[arm],
                ls="none" if quoted else "-" if seed == 0 else "--", marker="o" if quoted else None,
                label=f"{arm} seed {seed}" + (" (quoted)" if quoted else ""))
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_ylim(top=5.0)
    ax.set_title("attnres train --preset long (d256 x 8, 3.1M tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "loss.png", dpi=120)


def main(runs: Path) -> None:
    curves, seconds = load(runs)
    gaps, rows = gap_table(curves)
    lines = ["# Long preset: standard vs Block vs Full AttnRes, 3.1M tokens", "",
             "Made by `python results/long/collect.py` from the runs of `bash results/long/run.sh`. "
             "Columns marked (quoted) are the seed-0 probe of 2026-12-01 quoted in issue 11 (not rerun).", "",
             "## Validation loss (32 batches x 2,048 tokens of the held-out plays)", "", *curve_table(curves), "",
             "## Gaps to standard (same seed: same init of shared weights, same data order)", "",
             "Block is within a third of the Full–standard gap when |Block − Full| ≤ |Full − standard| / 3; the "
             "paper's claim is one-sided (Block's gain at least 2/3 of Full's), which a ratio above 1 (Block gains "
             "more than Full) also meets.", "", *gaps, "",
             "## Training time (sum of step times, two 1-thread runs sharing the 2-core CPU)", "",
             "| run | seconds |", "|---|---|",
             *(f"| {a}-s{s} | {t:.0f} |" for (a, s), t in sorted(seconds.items())), ""]
    (HERE / "tables.md").write_text("\n".join(lines))
    summary = dict(curves={f"{a}-s{s}": c for (a, s), c in curves.items()},
                   quoted=[f"{a}-s{s}" for (a, s) in PROBE if not (runs / f"{a}-s{s}").exists()], gaps=rows)
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(curves)
    print((HERE / "tables.md").read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/long"))
