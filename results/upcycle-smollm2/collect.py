"""Tabulate the upcycling study (run.sh's outputs in RUNS, default runs/upcycle) into this directory:
summary.json, report.md (tables) and loss.png (training loss per step, each arm)."""

import json
import sys
from pathlib import Path

ARMS = ("standard", "block", "full")
TEXTS = {"shakespeare-val": "Shakespeare val (Henry VI part 2, held out)", "brown": "Brown corpus (never seen)"}
HERE = Path(__file__).resolve().parent


def load(runs: Path) -> dict:
    out = {}
    for arm in ARMS:
        rows = [json.loads(x) for x in (runs / arm / "metrics.jsonl").read_text().splitlines() if x.strip()]
        ev = {f"{stage}-{t}": json.loads((runs / "eval" / f"{arm}-{stage}-{t}.json").read_text())
              for stage in ("init", "tuned") for t in TEXTS}
        out[arm] = {
            "eval": ev,
            "train": [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r],
            "val": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
            "result": json.loads((runs / arm / "result.json").read_text()),
        }
    return out


def table(s: dict) -> str:
    lines = ["| arm | " + " | ".join(f"{v}: before → after (Δ)" for v in TEXTS.values())
             + " | trainer val loss (step 40, 80) | train loss, mean of last 10 steps | step time (s) |",
             "|---|" + "---|" * (len(TEXTS) + 3)]
    for arm in ARMS:
        a = s[arm]
        cells = []
        for t in TEXTS:
            b, f = a["eval"][f"init-{t}"]["loss"], a["eval"][f"tuned-{t}"]["loss"]
            cells.append(f"{b:.4f} → {f:.4f} ({f - b:+.4f})")
        val = ", ".join(f"{v:.4f}" for _, v in a["val"])
        last = [x for _, x in a["train"][-10:]]
        cells += [val, f"{sum(last) / len(last):.4f}", f"{a['result']['step_time']:.2f}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def deltas(s: dict) -> str:
    lines = []
    for arm in ("block", "full"):
        for t, name in TEXTS.items():
            d = s[arm]["eval"][f"tuned-{t}"]["loss"] - s["standard"]["eval"][f"tuned-{t}"]["loss"]
            lines.append(f"- {arm} − standard after fine-tuning, {name}: {d:+.4f} nats")
        d = s[arm]["val"][-1][1] - s["standard"]["val"][-1][1]
        lines.append(f"- {arm} − standard, trainer's val loss at the last step: {d:+.4f} nats")
    return "\n".join(lines)


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, arm in enumerate(ARMS):
        steps, losses = zip(*s[arm]["train"], strict=True)
        ax.plot(steps, losses, color=f"C{i}", lw=1, label=f"{arm} (train)")
        vs, vl = zip(*s[arm]["val"], strict=True)
        ax.plot(vs, vl, "o--", color=f"C{i}", ms=4, label=f"{arm} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("SmolLM2-135M upcycled, fine-tuned on Shakespeare", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(runs: Path) -> None:
    s = load(runs)
    (HERE / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    plot(s, HERE / "loss.png")
    (HERE / "tables.md").write_text(table(s) + "\n\n" + deltas(s) + "\n")
    print(table(s))
    print(deltas(s))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/upcycle"))
