"""``attnres compare``: standard vs Block (N = ``attn_res_num_blocks``) vs Full, on equal terms.

Every arm gets the same config except ``residual``: the same seeds (model init and data order),
the same batches, tokens and hyperparameters; the shared weights even start identical, because
the AttnRes parameters are zero/one-initialised without drawing random numbers. The data is
prepared once. Arm ``<residual>`` with seed ``s`` trains into ``OUT/<residual>-s<s>/``.

Outputs: ``OUT/summary.json`` (one entry per run), ``OUT/report.md`` (table, command, machine,
versions, training dynamics, plots) and PNGs from :mod:`attnres.analysis`.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text, find_checkpoint
from .config import TrainConfig
from .loop import RunExistsError, environment, git_revision, last_probes, prepare, read_metrics, train

ARMS = ("standard", "block", "full")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(xs: list[float], digits: int) -> str:
    m, s = _mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def table_rows(runs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per residual: mean ± std over seeds; step-time ratio to standard (ratio of medians)."""
    by = {r: [x for x in runs if x["residual"] == r] for r in ARMS}
    base = statistics.median([x["step_time"] for x in by["standard"]]) if by["standard"] else None
    rows = []
    for residual, rs in by.items():
        if not rs:
            continue
        st = statistics.median([x["step_time"] for x in rs])
        rows.append(
            {
                "residual": residual + (f" (N={rs[0]['num_blocks']})" if residual == "block" else ""),
                "params": f"{rs[0]['params']:,}",
                "val loss": _fmt([x["val_loss"] for x in rs], 4),
                "ppl": _fmt([x["ppl"] for x in rs], 2),
                "bits/byte": _fmt([x["bpb"] for x in rs], 4),
                "tokens/s": f"{statistics.fmean([x['tokens_per_s'] for x in rs]):,.0f}",
                "step time ratio": f"{st / base:.3f}" if base else "-",
            }
        )
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def print_table(rows: list[dict[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for k in rows[0] if rows else []:
        t.add_column(k, justify="left" if k == "residual" else "right")
    for r in rows:
        t.add_row(*r.values())
    Console().print(t)


def _plots(
    out: Path, runs: list[dict[str, Any]], seeds: list[int]
) -> tuple[list[tuple[str, str]], str, list[str]]:
    """Draw the PNGs; returns ([(caption, file)], dynamics markdown, notes)."""
    notes: list[str] = []
    try:
        from ..analysis import (
            plot_depth_weights,
            plot_grad_norms,
            plot_losses,
            plot_magnitudes,
            summarize_dynamics,
        )
    except ImportError as e:
        return [], "", [f"plots skipped: attnres.analysis is not available ({e})"]
    pngs: list[tuple[str, str]] = []
    curves = [
        {
            "label": f"{r['residual']}-s{r['seed']}",
            "metrics": read_metrics(Path(r["out_dir"]) / "metrics.jsonl"),
        }
        for r in runs
    ]
    plot_losses(curves, out / "loss.png")
    pngs.append(("Training and validation loss", "loss.png"))
    seed = seeds[0]
    probes = {}
    for r in runs:
        if r["seed"] == seed:
            p = last_probes(read_metrics(Path(r["out_dir"]) / "metrics.jsonl"))
            if p is not None:
                probes[r["residual"]] = p
    dynamics = ""
    if probes:
        plot_magnitudes(probes, out / "magnitudes.png")
        plot_grad_norms(probes, out / "grad_norms.png")
        pngs += [
            (f"Output magnitude vs depth (seed {seed}, end of training)", "magnitudes.png"),
            (f"Gradient norm vs depth (seed {seed}, end of training)", "grad_norms.png"),
        ]
        for residual in ("full", "block"):
            if residual in probes:
                name = f"depth_weights_{residual}.png"
                plot_depth_weights(
                    probes[residual], out / name, f"{residual} AttnRes depth weights (seed {seed})"
                )
                pngs.append((f"Learned depth-attention weights, {residual} (seed {seed})", name))
        dynamics = summarize_dynamics(probes)
    else:
        notes.append("no probes recorded (probes=false): magnitude, gradient and depth-weight plots skipped")
    return pngs, dynamics, notes


def write_report(
    out: Path,
    cfg: TrainConfig,
    runs: list[dict[str, Any]],
    seeds: list[int],
    preset: str,
    argv: list[str],
    elapsed: float,
) -> str:
    rows = table_rows(runs)
    pngs, dynamics, notes = _plots(out, runs, seeds)
    env = environment()
    git = git_revision()
    per_run = markdown_table(
        [
            {
                "run": f"{r['residual']}-s{r['seed']}",
                "val loss": f"{r['val_loss']:.4f}",
                "ppl": f"{r['ppl']:.2f}",
                "bits/byte": f"{r['bpb']:.4f}",
                "train loss": f"{r['train_loss']:.4f}",
                "step time (s)": f"{r['step_time']:.3f}",
                "tokens/s": f"{r['tokens_per_s']:,.0f}",
            }
            for r in runs
        ]
    )
    cfg_lines = "\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.to_dict().items() if k != "residual")
    parts = [
        f"# AttnRes compare: `{preset}` preset, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}",
        "",
        f"Standard residual vs Block AttnRes (N={cfg.attn_res_num_blocks}) vs Full AttnRes, trained with "
        f"identical seeds, data order, tokens ({cfg.max_steps} steps x {cfg.tokens_per_step:,} tokens = "
        f"{cfg.max_steps * cfg.tokens_per_step:,} tokens) and hyperparameters. Validation metrics at the "
        "last step"
        + (
            f" over {cfg.eval_batches} batches of {cfg.batch_size} x {cfg.seq_len} tokens"
            if cfg.eval_batches
            else " over the whole validation split"
        )
        + "; mean ± std over seeds "
        + ", ".join(map(str, seeds))
        + ".",
        "",
        markdown_table(rows),
        "",
        "Step time is the median over steps; tokens/s = tokens per step / median step time; the ratio is to "
        "the standard arm's median step time. Bits per byte uses the validation split's average bytes per "
        "token (see attnres/train/evaluate.py).",
        "",
        "## Runs",
        "",
        per_run,
        "",
        "## Command",
        "",
        "```",
        "attnres " + shlex.join(argv),
        "```",
        "",
        f"Wall time {elapsed / 60:.1f} min.",
        "",
        "## Machine and versions",
        "",
        "\n".join(f"- {k}: {v}" for k, v in env.items()),
        f"- git: {git['commit'][:12] + (' (dirty)' if git['dirty'] else '') if git else 'unknown'}",
        "",
        "## Config (shared by all arms)",
        "",
        "```yaml",
        cfg_lines,
        "```",
    ]
    if dynamics:
        parts += ["", "## Training dynamics", "", dynamics.strip()]
    if pngs:
        parts += ["", "## Plots", ""]
        for caption, name in pngs:
            parts += [f"### {caption}", "", f"![{caption}]({name})", ""]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    text = "\n".join(parts).rstrip() + "\n"
    atomic_write_text(out / "report.md", text)
    return text


def compare(
    cfg: TrainConfig,
    out_dir: str | Path,
    seeds: list[int],
    *,
    preset: str = "default",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    argv: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Train every arm for every seed into ``out_dir``; write summary.json, report.md and plots.

    ``resume``: arms with a checkpoint continue from it (finished ones are kept as they are unless
    ``max_steps`` grew), missing ones start. The config must match the checkpoints' except for the
    keys in ``loop.RESUMABLE_KEYS``. Without ``resume`` or ``overwrite``, an ``out_dir`` that already
    holds runs is refused.
    """
    out = Path(out_dir)
    arms = [(s, r) for s in seeds for r in ARMS]
    dirs = {(s, r): out / f"{r}-s{s}" for s, r in arms}
    if not resume and not overwrite:
        taken = [d.name for d in dirs.values() if d.exists() and any(d.iterdir())]
        taken += [f for f in ("summary.json", "report.md") if (out / f).exists()]
        if taken:
            raise RunExistsError(
                f"{out} already holds results ({', '.join(taken)}); use --resume to continue or "
                f"--overwrite to replace them"
            )
    cfg.validate()
    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    data = prepare(cfg, progress)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed, residual in arms:
        arm = replace(cfg, residual=residual, seed=seed)
        d = dirs[(seed, residual)]
        # resume: every arm with a checkpoint continues from it (a finished one only re-reads its
        # metrics, or trains on when max_steps grew; a changed model/data/optimizer config is refused)
        again = resume and d.exists() and find_checkpoint(d) is not None
        summary = train(
            arm,
            d,
            resume=again,
            progress=progress,
            overwrite=not again,
            data=data,
            label=f"{residual}-s{seed}",
        )
        summary["num_blocks"] = cfg.attn_res_num_blocks
        runs.append(summary)
    atomic_write_text(out / "summary.json", json.dumps(runs, indent=2) + "\n")
    write_report(out, cfg, runs, seeds, preset, argv, time.time() - t0)
    return runs


def load_summary(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())


__all__ = ["ARMS", "compare", "load_summary", "markdown_table", "print_table", "table_rows", "write_report"]
