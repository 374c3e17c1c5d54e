"""``attnres compare``: residual schemes on equal terms; by default standard vs Block AttnRes (N blocks) vs
Full, and any registered scheme (``arms``: names of ``attnres.residual.RESIDUALS``) can be an arm.

Every arm gets the same config except ``residual``: the same seeds (model init and data order),
the same batches, tokens and hyperparameters; the shared weights even start identical, because
the AttnRes parameters are zero/one-initialised without drawing random numbers. The config carries
every scheme's keys; each arm's model reads its own scheme's (``TrainConfig.model_config``), and a
non-default key that no arm owns is refused. The data is prepared once. Arm ``<residual>`` with seed
``s`` trains into ``OUT/<residual>-s<s>/``.

Outputs: ``OUT/summary.json`` (one entry per run), ``OUT/report.md`` (table, command, machine,
versions, training dynamics, plots) and PNGs from :mod:`attnres.analysis`.

``resume`` continues the arms already in ``OUT`` with *their* saved config (the one config they
share), changing only the keys given explicitly now; it refuses, before training anything, saved
arms that differ from each other, a ``max_steps`` below an arm's step, and a change that would put
the arms on different learning-rate schedules. No report is written over arms that did not end
on equal terms.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text, find_checkpoint, load_trainer_state
from .config import (
    PRESETS,
    RESIDUALS,
    SCHEME_KEYS,
    ConfigError,
    TrainConfig,
    check_scheme_keys,
    config_from_dict,
    load_config,
)
from .loop import (
    RESUMABLE_KEYS,
    RunExistsError,
    environment,
    git_revision,
    last_probes,
    prepare,
    read_metrics,
    saved_config,
    train,
)

ARMS = ("standard", "block", "full")  # the default arms
ARM_KEYS = ("residual", "seed")  # the only keys in which the arms' configs differ
NAMES = {"standard": "the standard residual", "block": "Block AttnRes", "full": "Full AttnRes"}


def check_arms(arms) -> tuple[str, ...]:
    """``arms`` as a tuple of registered scheme names, at least one, each once; else a one-line error."""
    arms = tuple(arms)
    if not arms:
        raise ConfigError(f"compare needs at least one arm; allowed: {', '.join(RESIDUALS)}")
    bad = [a for a in arms if a not in RESIDUALS]
    if bad:
        raise ConfigError(f"unknown arm {', '.join(map(repr, bad))}; allowed: {', '.join(RESIDUALS)}")
    twice = sorted({a for a in arms if arms.count(a) > 1})
    if twice:
        raise ConfigError(f"arm {', '.join(map(repr, twice))} given twice")
    return arms


def _baseline(runs: list[dict[str, Any]]) -> str | None:
    """The arm step times are compared to: standard if it is an arm, else the first arm."""
    arms = list(dict.fromkeys(r["residual"] for r in runs))
    return "standard" if "standard" in arms else (arms[0] if arms else None)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(xs: list[float], digits: int) -> str:
    if all(x is None for x in xs):
        return "-"
    m, s = _mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def _num(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or "-" for a missing value (a run that never evaluated has no val loss)."""
    return "-" if x is None else format(x, spec)


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table_rows(runs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per residual (in the order of ``runs``): mean ± std over seeds; step-time ratio to the
    standard arm's (ratio of medians; to the first arm's without a standard arm)."""
    by = {r: [x for x in runs if x["residual"] == r] for r in dict.fromkeys(x["residual"] for x in runs)}
    base = _median([x["step_time"] for x in by.get(_baseline(runs), [])])
    rows = []
    for residual, rs in by.items():
        if not rs:
            continue
        st = _median([x["step_time"] for x in rs])
        tps = [x["tokens_per_s"] for x in rs if x.get("tokens_per_s") is not None]
        n = rs[0].get("num_blocks")
        rows.append(
            {
                "residual": residual + (f" (N={n})" if residual == "block" and n is not None else ""),
                "params": f"{rs[0]['params']:,}",
                "val loss": _fmt([x["val_loss"] for x in rs], 4),
                "ppl": _fmt([x["ppl"] for x in rs], 2),
                "bits/byte": _fmt([x["bpb"] for x in rs], 4),
                "tokens/s": f"{statistics.fmean(tps):,.0f}" if tps else "-",
                "step time ratio": f"{st / base:.3f}" if base and st is not None else "-",
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
    vocab_size: int | None = None,
) -> str:
    """Write ``out/report.md`` (and the plots); ``vocab_size``: the tokenizer's actual size (default:
    the runs' ``vocab_size``), shown instead of the configured BPE target when they differ."""
    rows = table_rows(runs)
    pngs, dynamics, notes = _plots(out, runs, seeds)
    env = environment()
    git = git_revision()
    per_run = markdown_table(
        [
            {
                "run": f"{r['residual']}-s{r['seed']}",
                "steps": str(r["steps"]),
                "val loss": _num(r["val_loss"], ".4f"),
                "ppl": _num(r["ppl"], ".2f"),
                "bits/byte": _num(r["bpb"], ".4f"),
                "train loss (last step)": _num(r["train_loss"], ".4f"),
                "step time (s)": _num(r["step_time"], ".3f"),
                "tokens/s": _num(r["tokens_per_s"], ",.0f"),
            }
            for r in runs
        ]
    )
    n_blocks = next((r["num_blocks"] for r in runs if r.get("num_blocks") is not None), None)
    if n_blocks is None and any(r["residual"] == "block" for r in runs):
        n_blocks = num_blocks(cfg)
    if vocab_size is None:
        vocab_size = next((r["vocab_size"] for r in runs if r.get("vocab_size") is not None), None)

    def cfg_line(k: str, v: Any) -> str:
        if k == "vocab_size" and vocab_size is not None and vocab_size != v:
            return f"vocab_size: {vocab_size}  # the {cfg.tokenizer} tokenizer's (the configured {v} is not used)"
        return f"{k}: {json.dumps(v)}"

    arms = list(dict.fromkeys(r["residual"] for r in runs))
    # the scheme keys no arm reads are left out (they are at their defaults)
    owned = {k for k, owners in SCHEME_KEYS.items() if set(owners) & set(arms)}
    cfg_lines = "\n".join(
        cfg_line(k, v) for k, v in cfg.to_dict().items() if k not in ARM_KEYS and (k not in SCHEME_KEYS or k in owned)
    )
    names = [NAMES.get(a, a) + (f" (N={n_blocks})" if a == "block" else "") for a in arms]
    title = " vs ".join(names)
    parts = [
        f"# AttnRes compare: `{preset}` preset, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}",
        "",
        f"{title[:1].upper() + title[1:]}, trained with "
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
        f"the {_baseline(runs)} arm's median step time. Bits per byte uses the validation split's average bytes per "
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

# ----------------------------------------------------------------------------- equal terms


def num_blocks(cfg: TrainConfig) -> int:
    """N of the block arm as the model builds it (``BlockAttnRes.num_blocks``): with
    ``attn_res_block_size`` set it is ceil(sublayers / S), not ``attn_res_num_blocks``."""
    from ..residual import BlockAttnRes

    mc = replace(cfg, residual="block").model_config()
    return BlockAttnRes(mc.num_sublayers, mc.block_size).num_blocks


def _schedule(history: list[tuple[int, int]], step: int, max_steps: int) -> list[tuple[int, int]]:
    """Add "from ``step`` on, the schedule is ``max_steps`` long" to a max_steps history.

    An entry at or after ``step`` was superseded (training went on from ``step``), and an entry
    that keeps the length is no change."""
    out = [(k, m) for k, m in history if k < step]
    if not out or out[-1][1] != max_steps:
        out.append((step, max_steps))
    return out


def schedule_history(run_dir: Path, step: int, max_steps: int) -> list[tuple[int, int]]:
    """[(step, max_steps), ...]: the learning-rate schedule a run trained on up to ``step`` (its
    checkpoint's), from run.json's config and resumes; ``max_steps``: its checkpoint's."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
        hist = _schedule([], 0, int(info["config"]["max_steps"]))
        for r in info.get("resumes", []):
            if r["step"] <= step:
                hist = _schedule(hist, int(r["step"]), int(r["config"]["max_steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        hist = []
    # entries past the checkpoint were rolled back; the checkpoint's own config has the last word
    if not hist or hist[-1][1] != max_steps:
        hist = _schedule(hist, hist[-1][0] if hist else 0, max_steps)
    return hist


def _fmt_schedule(hist: list[tuple[int, int]]) -> str:
    return ", then ".join(f"max_steps {m} from step {k}" for k, m in hist)


def _arm_states(dirs: dict[tuple[int, str], Path]) -> dict[str, tuple[TrainConfig, int, Path]]:
    """label -> (saved config, checkpoint step, run dir) of every arm that has a checkpoint."""
    states = {}
    for (seed, residual), d in dirs.items():
        ckpt = find_checkpoint(d) if d.exists() else None
        if ckpt is not None:
            st = load_trainer_state(ckpt)
            states[f"{residual}-s{seed}"] = (config_from_dict(st["train_config"]), int(st["step"]), d)
    return states


def _reads(residual: str, key: str) -> bool:
    """Whether an arm of ``residual`` reads config key ``key`` (every key but the other schemes' keys)."""
    return key not in SCHEME_KEYS or residual in SCHEME_KEYS[key]


def _differences(configs: dict[str, TrainConfig], ignore=()) -> dict[str, dict[str, Any]]:
    """key -> {label: value} for every key (outside ARM_KEYS and ``ignore``) the configs disagree on; a
    scheme's key is compared between the arms of the schemes that read it only."""
    dicts = {label: c.to_dict() for label, c in configs.items()}
    keys = next(iter(dicts.values())).keys() if dicts else ()
    out = {}
    for k in keys:
        if k in ARM_KEYS or k in ignore:
            continue
        values = {label: d[k] for label, d in dicts.items() if _reads(d["residual"], k)}
        if len({json.dumps(v) for v in values.values()}) > 1:
            out[k] = values
    return out


def _fmt_differences(diff: dict[str, dict[str, Any]]) -> str:
    return "; ".join(
        f"{k}: " + ", ".join(f"{label} {v!r}" for label, v in values.items()) for k, values in diff.items()
    )


def explicit_keys(cfg: TrainConfig, preset: str) -> dict[str, Any]:
    """The keys of ``cfg`` that differ from ``preset`` (every key, for a preset not in PRESETS)."""
    now = cfg.to_dict()
    if preset not in PRESETS:
        return {k: v for k, v in now.items() if k not in ARM_KEYS}
    base = load_config(preset).to_dict()
    return {k: v for k, v in now.items() if k not in ARM_KEYS and v != base[k]}


def resume_config(
    cfg: TrainConfig,
    dirs: dict[tuple[int, str], Path],
    explicit: dict[str, Any],
) -> TrainConfig:
    """The config ``compare --resume`` continues with: the saved arms' shared config with the
    ``explicit`` keys applied. Raises :class:`ConfigError` (nothing trained, nothing changed) when
    the saved arms differ, an explicit key may not change on resume, ``max_steps`` is below an
    arm's step, or the arms would end up on different learning-rate schedules."""
    states = _arm_states(dirs)
    if not states:
        return cfg
    saved = {label: c for label, (c, _, _) in states.items()}
    resumable = {k for k in explicit if k in RESUMABLE_KEYS}
    diff = _differences(saved, ignore=resumable)
    if diff:
        fixable = all(k in RESUMABLE_KEYS for k in diff)
        raise ConfigError(
            "compare --resume: the arms in OUT were saved with different configs, so they are not a "
            f"like-for-like comparison ({_fmt_differences(diff)}); "
            + (
                "choose the value with --set KEY=VALUE"
                if fixable
                else "start a new compare (another --out, or --overwrite)"
            )
        )
    # the arms' shared config: a scheme key as the saved arms that read it have it
    base = next(iter(saved.values()))
    read = {k: next(c for c in saved.values() if _reads(c.residual, k)) for k in SCHEME_KEYS
            if any(_reads(c.residual, k) for c in saved.values())}
    base = replace(base, **{k: getattr(c, k) for k, c in read.items()})
    changed = {
        k: (getattr(base, k), v)
        for k, v in explicit.items()
        if k not in RESUMABLE_KEYS
        and (k not in SCHEME_KEYS or k in read)  # a key no saved arm reads may change (a new arm's)
        and json.dumps(base.to_dict()[k]) != json.dumps(cfg.to_dict()[k])
    }
    if changed:
        raise ConfigError(
            "compare --resume: cannot resume with a different config: "
            + "; ".join(f"{k}: the arms have {a!r}, now {b!r}" for k, (a, b) in changed.items())
            + " (start a new compare: another --out, or --overwrite)"
        )
    new = replace(base, **{k: getattr(cfg, k) for k in explicit if k not in ARM_KEYS}).validate()
    behind = {label: step for label, (_, step, _) in states.items() if step > new.max_steps}
    if behind:
        raise ConfigError(
            f"compare --resume: max_steps={new.max_steps} is below the step some arms already reached ("
            + ", ".join(f"{label} at step {s}" for label, s in behind.items())
            + f"); use max_steps >= {max(behind.values())}"
        )
    # the schedule each arm would train on: its history so far, then new.max_steps from its step
    plans = {}
    for seed, residual in dirs:
        label = f"{residual}-s{seed}"
        if label in states:
            c, step, d = states[label]
            plans[label] = _schedule(schedule_history(d, step, c.max_steps), step, new.max_steps)
        else:
            plans[label] = [(0, new.max_steps)]
    if len({tuple(h) for h in plans.values()}) > 1:
        steps = sorted({step for _, step, _ in states.values()})
        hint = (
            f"bring every arm to the same step first (compare --resume --set max_steps={base.max_steps}), "
            "then change max_steps"
            if len(states) < len(dirs) or len(steps) > 1
            else "start a new compare (another --out, or --overwrite)"
        )
        raise ConfigError(
            "compare --resume: the arms would train on different learning-rate schedules ("
            + "; ".join(f"{label}: {_fmt_schedule(h)}" for label, h in plans.items())
            + f"); {hint}"
        )
    return new


def check_equal_terms(runs: list[dict[str, Any]]) -> None:
    """Raise :class:`ConfigError` unless every run ended at the same step, evaluated there, with the
    same saved config (outside ARM_KEYS) and the same learning-rate schedule history."""
    problems = []
    steps = {f"{r['residual']}-s{r['seed']}": r["steps"] for r in runs}
    if len(set(steps.values())) > 1:
        problems.append("different steps (" + ", ".join(f"{k} {v}" for k, v in steps.items()) + ")")
    unevaluated = [
        f"{r['residual']}-s{r['seed']}"
        for r in runs
        if r.get("val_loss") is None or _last_eval_step(Path(r["out_dir"])) != r["steps"]
    ]
    if unevaluated:
        problems.append("no validation at the last step in " + ", ".join(unevaluated))
    states = _arm_states({(r["seed"], r["residual"]): Path(r["out_dir"]) for r in runs})
    diff = _differences({k: c for k, (c, _, _) in states.items()})
    if diff:
        problems.append(f"different configs ({_fmt_differences(diff)})")
    hists = {k: schedule_history(d, step, c.max_steps) for k, (c, step, d) in states.items()}
    if len({tuple(h) for h in hists.values()}) > 1:
        problems.append(
            "different learning-rate schedules ("
            + "; ".join(f"{k}: {_fmt_schedule(h)}" for k, h in hists.items())
            + ")"
        )
    if problems:
        raise ConfigError(
            "compare: not writing a report, the arms are not on equal terms: " + "; ".join(problems)
            + "; continue them with compare --resume (max_steps >= the furthest arm's step)"
        )


def _last_eval_step(run_dir: Path) -> int | None:
    evals = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
    return evals[-1] if evals else None


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
    overrides: Iterable[str] | None = None,
    arms: Iterable[str] = ARMS,
) -> list[dict[str, Any]]:
    """Train every arm (``arms``: registered scheme names, default standard, block, full) for every seed
    into ``out_dir``; write summary.json, report.md and plots. Every arm's config is checked first (one
    line, before anything is trained or created): a scheme key no arm owns, a scheme key or model shape
    one arm's scheme refuses.

    ``resume``: the arms' saved config is the base (see :func:`resume_config`); the keys named in
    ``overrides`` (the CLI passes what --set and --config chose; default: the keys in which ``cfg``
    differs from ``preset``) apply over it with ``cfg``'s values, and may only be
    ``loop.RESUMABLE_KEYS`` or equal to the saved values.
    Arms with a checkpoint continue from it (finished ones are kept as they are unless ``max_steps``
    grew), missing ones start. Without ``resume`` or ``overwrite``, an ``out_dir`` that already
    holds runs is refused. Raises :class:`ConfigError` instead of writing a report over arms that
    did not end on equal terms.
    """
    out = Path(out_dir)
    schemes = check_arms(arms)
    arms = [(s, r) for s in seeds for r in schemes]
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
    if resume:
        explicit = explicit_keys(cfg, preset) if overrides is None else {
            k: getattr(cfg, k) for k in overrides if k not in ARM_KEYS
        }
        cfg = resume_config(cfg, dirs, explicit)
    check_scheme_keys(cfg, SCHEME_KEYS, schemes)
    for residual in schemes:  # each arm's model (its scheme's keys against the model's shape)
        replace(cfg, residual=residual).validate()
    t0 = time.time()
    data = prepare(cfg, progress)
    out.mkdir(parents=True, exist_ok=True)
    blocks, vocab = (num_blocks(cfg) if "block" in schemes else None), len(data.tokenizer)
    runs = []
    for seed, residual in arms:
        arm = replace(cfg, residual=residual, seed=seed)
        d = dirs[(seed, residual)]
        # resume: every arm with a checkpoint continues from it (a finished one only re-reads its
        # metrics, or trains on when max_steps grew; a changed model/data/optimizer config is refused)
        again = resume and d.exists() and find_checkpoint(d) is not None
        if again:  # the keys of other schemes, which this arm does not read, as it saved them
            saved = saved_config(d)
            arm = replace(arm, **{k: getattr(saved, k) for k in SCHEME_KEYS if not _reads(residual, k)})
        summary = train(
            arm,
            d,
            resume=again,
            progress=progress,
            overwrite=not again,
            data=data,
            label=f"{residual}-s{seed}",
        )
        summary["num_blocks"] = blocks
        summary["vocab_size"] = vocab
        runs.append(summary)
    check_equal_terms(runs)
    atomic_write_text(out / "summary.json", json.dumps(runs, indent=2) + "\n")
    write_report(out, cfg, runs, seeds, preset, argv, time.time() - t0, vocab_size=vocab)
    return runs


def load_summary(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())


__all__ = [
    "ARMS",
    "check_arms",
    "compare",
    "load_summary",
    "markdown_table",
    "print_table",
    "table_rows",
    "write_report",
]
