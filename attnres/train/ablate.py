"""``attnres ablate``: chosen arms at one shape and budget, K seeds each, paired with a baseline (ZOO §5).

An **arm** is a residual scheme plus config overrides, ``SCHEME[:KEY=VALUE[,KEY=VALUE...]]``: ``block``,
``block:attn_res_weights=sigmoid``, ``full:attn_res_window=2``, ``denseformer``, ``mhc:hyper_streams=4``.
An arm may set its own scheme's keys (:data:`attnres.train.config.SCHEME_KEYS`) and the few shared keys
of :data:`ARM_SHARED_KEYS` (block layout, final aggregation, optimizer); the shape, data, budget and
bookkeeping are the shared config's (``--preset`` / ``--config`` / ``--set``).

Pairing: every arm trains seeds ``0..K-1``; for a given seed every arm sees the same batches (the data
order is a function of the seed) and starts from the same shared weights: before the first step, each
weight of an arm that the baseline also has (same name and shape) is copied from the baseline model
built at that seed (``pairing.json`` in the run directory says how many there were and how many had to
be re-aligned, e.g. where a scheme draws random numbers at init). The paired delta of an arm is
``val_loss(arm, s) - val_loss(baseline, s)`` per seed, reported as mean ± the 95% t-interval half-width
``t_{0.975, n-1} * sd / sqrt(n)`` (scipy's t quantile when scipy is installed, else a table for
df <= 30 and a Cornish-Fisher expansion above; the report says which).

Layout: arm ``A`` with seed ``s`` trains into ``OUT/<label(A)>-s<s>/`` (``label``: the canonical spec with
``:`` and ``,`` as ``+``). A finished run (checkpoint at ``max_steps``, ``result.json``, the same config)
is skipped, so a second invocation only trains what is missing; an unfinished one (a crash or Ctrl-C
after a checkpoint) continues with ``resume=True`` and is refused without it; ``overwrite`` retrains all.
FLOPs per token are measured once per arm with :class:`torch.utils.flop_counter.FlopCounterMode` on one
training forward + backward (``OUT/flops.json``). Outputs: ``OUT/report.md``, ``OUT/summary.json``,
``OUT/ablate.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text, find_checkpoint, load_trainer_state
from .config import (
    RESIDUALS,
    SCHEME_KEYS,
    ConfigError,
    TrainConfig,
    check_scheme_keys,
    coerce,
    config_diff,
    config_from_dict,
)
from .loop import RESUMABLE_KEYS, NonFiniteLoss, environment, git_revision, prepare, train

# keys besides its own scheme's that an arm may set (one value each, so no list-valued keys)
ARM_SHARED_KEYS = (
    "attn_res_block_size",
    "attn_res_num_blocks",
    "attn_res_block_layers",
    "attn_res_final_aggregation",
    "attn_res_two_phase",
    "initializer_range",
    "optimizer",
    "lr",
    "weight_decay",
    "muon_momentum",
    "warmup_steps",
    "schedule",
    "decay_fraction",
    "min_lr_ratio",
    "grad_clip",
)
DIVERGED = "diverged.json"  # a run stopped by a non-finite loss: its config and result
PAIRING = "pairing.json"  # an arm's init from the baseline: {baseline, shared, realigned}
# a finished run is reused when its config differs from the arm's only in these (where files are, threads)
_REUSABLE_DIFF = RESUMABLE_KEYS - {"max_steps", "eval_batches"}

# t_{0.975, df} for df = 1..30
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


# ----------------------------------------------------------------------------- arms


def _scheme_keys(scheme: str) -> list[str]:
    return [k for k, owners in SCHEME_KEYS.items() if scheme in owners]


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    return repr(v) if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Arm:
    """A residual scheme plus config overrides (typed, in the order given)."""

    scheme: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def spec(self) -> str:
        """The canonical spec, ``scheme[:k=v,...]``."""
        if not self.overrides:
            return self.scheme
        return self.scheme + ":" + ",".join(f"{k}={_fmt_value(v)}" for k, v in self.overrides)

    @property
    def label(self) -> str:
        """The spec as a directory name."""
        return self.spec.replace(":", "+").replace(",", "+")

    def config(self, cfg: TrainConfig, seed: int | None = None) -> TrainConfig:
        """The shared ``cfg`` as this arm (and ``seed``), not yet validated."""
        kw = dict(self.overrides)
        if seed is not None:
            kw["seed"] = seed
        return replace(cfg, residual=self.scheme, **kw)

    def __str__(self) -> str:
        return self.spec


def parse_arm(text: str) -> Arm:
    """``SCHEME[:KEY=VALUE,...]`` -> :class:`Arm`; a one-line :class:`ConfigError` naming the bad part and
    what is allowed."""
    spec = text.strip()
    name, colon, rest = spec.partition(":")
    name = name.strip()
    if name not in RESIDUALS:
        raise ConfigError(f"arm {text!r}: unknown scheme {name!r}; schemes: {', '.join(RESIDUALS)}")
    own = _scheme_keys(name)
    takes = f"{name} takes: {', '.join(own) or 'no scheme keys'}; any arm: {', '.join(ARM_SHARED_KEYS)}"
    if colon and not rest.strip():
        raise ConfigError(f"arm {text!r}: nothing after ':'; give KEY=VALUE[,KEY=VALUE...] ({takes})")
    overrides: dict[str, Any] = {}
    for part in rest.split(",") if colon else []:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"arm {text!r}: {part.strip()!r} is not KEY=VALUE ({takes})")
        if key in SCHEME_KEYS and key not in own:
            raise ConfigError(
                f"arm {text!r}: {key!r} is a key of residual={'/'.join(SCHEME_KEYS[key])}, not of {name!r} ({takes})"
            )
        if key not in own and key not in ARM_SHARED_KEYS:
            raise ConfigError(f"arm {text!r}: {key!r} is not a key an arm may set ({takes})")
        if key in overrides:
            raise ConfigError(f"arm {text!r}: {key!r} given twice")
        try:
            overrides[key] = coerce(key, value.strip())
        except ConfigError as e:
            raise ConfigError(f"arm {text!r}: {e}") from None
    return Arm(name, tuple(overrides.items()))


def parse_arms(texts, baseline: str | Arm = "standard") -> tuple[Arm, list[Arm]]:
    """(baseline, every arm with the baseline first, each once)."""
    base = baseline if isinstance(baseline, Arm) else parse_arm(baseline)
    arms = [parse_arm(t) if not isinstance(t, Arm) else t for t in texts]
    if not arms:
        raise ConfigError(f"ablate needs at least one arm, e.g. block or full:attn_res_window=2; schemes: "
                          f"{', '.join(RESIDUALS)}")
    seen: dict[Arm, int] = {}
    for a in arms:
        seen[a] = seen.get(a, 0) + 1
    twice = [a.spec for a, n in seen.items() if n > 1]
    if twice:
        raise ConfigError(f"arm {', '.join(map(repr, twice))} given twice")
    labels = [a.label for a in seen]
    if len(set(labels)) != len(labels):
        raise ConfigError("two arms map to the same directory name; write their keys in one order")
    return base, [base] + [a for a in arms if a != base]


# ----------------------------------------------------------------------------- statistics


def t_quantile(df: int) -> tuple[float, str]:
    """(t_{0.975, df}, where it came from)."""
    if df < 1:
        return float("nan"), "n/a"
    try:
        from scipy.stats import t  # type: ignore[import-not-found]

        return float(t.ppf(0.975, df)), "scipy.stats.t"
    except ImportError:
        pass
    if df <= len(T_975):
        return T_975[df - 1], "table (scipy not installed)"
    z = 1.959963984540054  # Cornish-Fisher expansion of the t quantile in 1/df
    q = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    return q, "Cornish-Fisher expansion (scipy not installed, df > 30)"


def paired_delta(arm: list[float], base: list[float]) -> dict[str, Any]:
    """Per-pair differences ``arm - base``: mean, sd, n and the 95% t-interval half-width."""
    d = [a - b for a, b in zip(arm, base, strict=True)]
    n = len(d)
    mean = statistics.fmean(d) if d else float("nan")
    sd = statistics.stdev(d) if n > 1 else float("nan")
    t, source = t_quantile(n - 1)
    half = t * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"deltas": d, "mean": mean, "sd": sd, "n": n, "t": t, "half_width": half, "t_source": source}


# ----------------------------------------------------------------------------- measurements


def _fingerprint(cfg: TrainConfig, vocab: int) -> str:
    keys = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "data_dir", "num_threads")}
    return hashlib.sha256(json.dumps([keys, vocab], sort_keys=True, default=str).encode()).hexdigest()[:16]


def measure_flops(cfg: TrainConfig, vocab: int) -> dict[str, Any]:
    """FLOPs per token of one training forward + backward of ``cfg``'s model (one micro-batch of
    ``batch_size x seq_len`` random tokens, labels = inputs) as FlopCounterMode counts them, and the
    parameter count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .evaluate import autocast
    from .trainer import build_model

    threads = torch.get_num_threads()
    try:
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = build_model(cfg, vocab).to(cfg.device).train()
            ids = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), device=cfg.device)
        counter = FlopCounterMode(display=False)
        with counter:
            with autocast(cfg.device, cfg.bf16):
                loss = model(ids, labels=ids, use_cache=False).loss
            loss.backward()
        return {
            "flops_per_token": counter.get_total_flops() / (cfg.batch_size * cfg.seq_len),
            "params": sum(p.numel() for p in model.parameters()),
        }
    finally:
        torch.set_num_threads(threads)


def pairing_wrap(base_cfg: TrainConfig, vocab: int, record: Path | None = None, name: str | None = None):
    """A ``train(wrap=)`` that copies into a fresh model every weight the baseline model of ``base_cfg``
    (built at its seed) also has, by name and shape, so the arms share their initial shared weights; the
    RNG states are left as they were. ``record``: write ``{shared, realigned, baseline}`` there (``name``:
    the baseline's spec, default its residual)."""

    def wrap(model):
        import numpy as np
        import torch

        from .trainer import build_model, seed_everything

        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            seed_everything(base_cfg.seed)
            base = build_model(base_cfg, vocab).state_dict()
        random.setstate(py)
        np.random.set_state(npy)
        shared = realigned = 0
        with torch.no_grad():
            for key, t in model.state_dict().items():
                s = base.get(key)
                if s is not None and s.shape == t.shape:
                    shared += 1
                    if not torch.equal(s.to(t.device, t.dtype), t):
                        realigned += 1
                        t.copy_(s)
        if record is not None:
            atomic_write_text(record, json.dumps(
                {"baseline": name or base_cfg.residual, "shared": shared, "realigned": realigned}) + "\n")
        return model

    return wrap


# ----------------------------------------------------------------------------- runs


def _run_state(d: Path, cfg: TrainConfig) -> tuple[str, int | None]:
    """("fresh" | "finished" | "unfinished" | "diverged", checkpoint step) of the run in ``d`` for the arm
    config ``cfg``; a run of another config is a :class:`ConfigError`."""
    ckpt = find_checkpoint(d) if d.exists() else None
    diverged = d / DIVERGED
    if diverged.is_file():
        saved, step = config_from_dict(json.loads(diverged.read_text())["config"]), None
    elif ckpt is None:
        return "fresh", None
    else:
        st = load_trainer_state(ckpt)
        saved, step = config_from_dict(st["train_config"]), int(st["step"])
    diff = {k: v for k, v in config_diff(saved, cfg).items() if k not in _REUSABLE_DIFF}
    if diff:
        raise ConfigError(
            f"{d} was trained with another config ("
            + "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            + "); use another --out, or --overwrite"
        )
    if diverged.is_file():
        return "diverged", None
    if step >= cfg.max_steps and (d / "result.json").is_file():
        return "finished", step
    return "unfinished", step


def _check_pairing(started: dict[tuple[int, Arm], Path], base: Arm) -> None:
    """Refuse to reuse runs that were paired with another baseline: an arm's run must have been initialised
    from ``base``; the baseline's own run from nothing else, or with nothing changed."""
    bad = []
    for (_, a), d in started.items():
        try:
            p = json.loads((d / PAIRING).read_text())
        except (OSError, ValueError):
            p = None
        if a == base:
            if p is not None and p.get("realigned"):
                bad.append(f"{d.name} (initialised from {p.get('baseline')!r})")
        elif p is None or p.get("baseline") != base.spec:
            bad.append(f"{d.name} (initialised from " + (repr(p.get("baseline")) if p else "its own init") + ")")
    if bad:
        raise ConfigError(
            f"runs in {next(iter(started.values())).parent} were not paired with the baseline "
            f"{base.spec!r}: {', '.join(bad)}; use another --out, the same --baseline, or --overwrite"
        )


def _diverged(d: Path, cfg: TrainConfig, params: int, e: Exception) -> dict[str, Any]:
    """The result of a run stopped by a non-finite loss, recorded in ``d/diverged.json`` (with its config)."""
    message = " ".join(str(e).split())
    result = {
        "residual": cfg.residual, "seed": cfg.seed, "params": params, "steps": None, "tokens": None,
        "train_loss": None, "val_loss": None, "ppl": None, "bpb": None, "step_time": None, "tokens_per_s": None,
        "train_time": None, "out_dir": str(d), "diverged": message,
    }
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / DIVERGED, json.dumps({"config": cfg.to_dict(), "result": result}, indent=2) + "\n")
    return result


def _finite(x: Any) -> Any:
    """JSON-safe: nan/inf -> None, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def ablate(
    cfg: TrainConfig,
    out_dir: str | Path,
    arms,
    *,
    baseline: str | Arm = "standard",
    seeds: list[int] | None = None,
    preset: str = "default",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Train every arm (specs or :class:`Arm`) and the baseline for every seed (default 0, 1, 2) into
    ``out_dir`` on the shared ``cfg``; measure FLOPs; write summary.json, report.md and ablate.png.
    Returns the summary. Every arm's config is checked before anything is trained."""
    out = Path(out_dir)
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    if not seeds:
        raise ConfigError("ablate needs at least one seed")
    base, arms = parse_arms(arms, baseline)
    argv = list(sys.argv[1:] if argv is None else argv)
    check_scheme_keys(cfg, SCHEME_KEYS, [a.scheme for a in arms])
    cfgs = {}
    for a in arms:
        try:
            cfgs[a] = a.config(cfg).validate()
        except ConfigError as e:
            raise ConfigError(f"arm {a.spec!r}: {e}") from None
    runs = [(s, a) for s in seeds for a in arms]
    dirs = {(s, a): out / f"{a.label}-s{s}" for s, a in runs}
    states = {}
    if not overwrite:
        for (s, a), d in dirs.items():
            states[(s, a)] = _run_state(d, replace(cfgs[a], seed=s))
        _check_pairing({k: dirs[k] for k, (st, _) in states.items() if st != "fresh"}, base)
        unfinished = [dirs[k].name for k, (st, _) in states.items() if st == "unfinished"]
        if unfinished and not resume:
            raise ConfigError(
                f"unfinished runs in {out}: {', '.join(unfinished)}; continue them with --resume "
                "(or retrain everything with --overwrite)"
            )
    t0 = time.time()
    data = prepare(cfg, progress)
    vocab = len(data.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    flops = _flops(out, arms, cfgs, vocab, overwrite)
    results: dict[tuple[int, Arm], dict[str, Any]] = {}
    for i, (s, a) in enumerate(runs):
        d = dirs[(s, a)]
        state, _ = states.get((s, a), ("fresh", None))
        label = f"{a.spec} s{s}"
        if progress:
            _say(f"[{i + 1}/{len(runs)}] {label}: " + ("finished, skipped" if state == "finished" else state))
        arm_cfg = replace(cfgs[a], seed=s)
        if state == "finished":
            results[(s, a)] = json.loads((d / "result.json").read_text())
            continue
        if state == "diverged":  # deterministic: training it again would diverge again (--overwrite retries)
            results[(s, a)] = json.loads((d / DIVERGED).read_text())["result"]
            continue
        (d / DIVERGED).unlink(missing_ok=True)
        wrap = None
        if state == "fresh":
            (d / PAIRING).unlink(missing_ok=True)
            if a != base:
                wrap = pairing_wrap(replace(cfgs[base], seed=s), vocab, d / PAIRING, base.spec)
        try:
            results[(s, a)] = train(
                arm_cfg, d, resume=state == "unfinished", progress=progress, overwrite=state == "fresh",
                data=data, label=label, wrap=wrap,
            )
        except NonFiniteLoss as e:  # one arm blowing up is a result of the ablation, not the end of it
            results[(s, a)] = _diverged(d, arm_cfg, flops[a.spec]["params"], e)
            if progress:
                _say(f"{label}: diverged ({e})")
    for (s, a), r in results.items():
        pairing = dirs[(s, a)] / PAIRING
        if pairing.is_file():
            r["pairing"] = json.loads(pairing.read_text())
    summary = summarize(base, arms, seeds, results, flops, cfg)
    summary["vocab_size"] = vocab
    summary["command"] = "attnres " + shlex.join(argv)
    atomic_write_text(out / "summary.json", json.dumps(_finite(summary), indent=2) + "\n")
    plot = plot_arms(summary, out / "ablate.png")
    write_report(out, summary, cfg, preset, time.time() - t0, plot)
    return summary


def _flops(out: Path, arms: list[Arm], cfgs: dict[Arm, TrainConfig], vocab: int, overwrite: bool) -> dict:
    """spec -> {flops_per_token, params}, measured once per arm and kept in ``OUT/flops.json``."""
    path = out / "flops.json"
    try:
        cache = {} if overwrite else json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    res = {}
    for a in arms:
        fp = _fingerprint(cfgs[a], vocab)
        hit = cache.get(a.spec)
        if not (isinstance(hit, dict) and hit.get("fingerprint") == fp):
            hit = {**measure_flops(replace(cfgs[a], seed=0), vocab), "fingerprint": fp}
        res[a.spec] = hit
    atomic_write_text(path, json.dumps(res, indent=2) + "\n")
    return res


def _say(text: str) -> None:
    try:
        from rich.console import Console

        Console(stderr=True).print(text, highlight=False)
    except ImportError:
        print(text, file=sys.stderr)


# ----------------------------------------------------------------------------- summary and report


def summarize(base: Arm, arms: list[Arm], seeds: list[int], results: dict, flops: dict, cfg: TrainConfig) -> dict:
    """The summary: per arm mean ± std over seeds, the paired delta to the baseline, params, FLOPs/token,
    wall time; and every run."""
    rows = []
    for a in arms:
        rs = [results[(s, a)] for s in seeds]
        vals = [r["val_loss"] for r in rs]
        times = [r["train_time"] for r in rs if r.get("train_time") is not None]
        pairs = [(r["val_loss"], results[(s, base)]["val_loss"]) for s, r in zip(seeds, rs, strict=True)]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        delta = paired_delta([x for x, _ in pairs], [y for _, y in pairs]) if a != base else None
        got = [v for v in vals if v is not None]
        rows.append({
            "arm": a.spec,
            "label": a.label,
            "scheme": a.scheme,
            "overrides": dict(a.overrides),
            "params": rs[0]["params"],
            "flops_per_token": flops[a.spec]["flops_per_token"],
            "val_loss": vals,
            "val_loss_mean": statistics.fmean(got) if got else float("nan"),
            "val_loss_std": statistics.stdev(got) if len(got) > 1 else float("nan"),
            "delta": delta,
            "diverged": [r["seed"] for r in rs if r.get("diverged")],
            "wall_time": times,
            "wall_time_mean": statistics.fmean(times) if times else float("nan"),
            "wall_time_std": statistics.stdev(times) if len(times) > 1 else float("nan"),
            "step_time_median": statistics.median([r["step_time"] for r in rs if r["step_time"] is not None] or
                                                  [float("nan")]),
        })
    return {
        "baseline": base.spec,
        "seeds": seeds,
        "steps": cfg.max_steps,
        "tokens_per_step": cfg.tokens_per_step,
        "t_source": t_quantile(max(len(seeds) - 1, 1))[1],
        "arms": rows,
        "runs": [{"arm": a.spec, **results[(s, a)]} for s in seeds for a in arms],
        "config": cfg.to_dict(),
    }


def _pm(m: float | None, s: float | None, spec: str, spread: str | None = None) -> str:
    """``m ± s`` (``s`` formatted with ``spread``, default ``spec``), ``m`` alone without a finite ``s``."""
    if m is None or not math.isfinite(m):
        return "-"
    if s is None or not math.isfinite(s):
        return format(m, spec)
    return f"{format(m, spec)} ± {format(s, spread or spec)}"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if math.isfinite(a) and math.isfinite(b) and b > 0 else "-"


def table_rows(summary: dict) -> list[dict[str, str]]:
    """The Table-4-style rows of a summary."""
    base = summary["arms"][0]
    rows = []
    for r in summary["arms"]:
        d = r["delta"]
        rows.append({
            "arm": r["arm"] + (" (baseline)" if r["arm"] == summary["baseline"] else ""),
            "val loss": _pm(r["val_loss_mean"], r["val_loss_std"], ".4f")
            + (f" ({len(r['diverged'])}/{len(r['val_loss'])} diverged)" if r["diverged"] else ""),
            "Δ vs baseline (95% CI)": "-" if d is None else _pm(d["mean"], d["half_width"], "+.4f", ".4f"),
            "params": f"{r['params']:,}",
            "FLOPs/token": _si(r["flops_per_token"]),
            "FLOPs ratio": f"{r['flops_per_token'] / base['flops_per_token']:.3f}",
            "wall time (s)": _pm(r["wall_time_mean"], r["wall_time_std"], ".2f"),
            "wall ratio": _ratio(r["wall_time_mean"], base["wall_time_mean"]),
        })
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows])


def print_table(summary: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = table_rows(summary)
    t = Table(title=title)
    for k in rows[0]:
        t.add_column(k, justify="left" if k == "arm" else "right", overflow="fold")
    for r in rows:
        t.add_row(*r.values())
    console = Console()
    if not console.is_terminal:  # a log file: one line per arm rather than rich's 80 columns
        console = Console(width=200)
    console.print(t)


def plot_arms(summary: dict, path: Path) -> str | None:
    """Left: final val loss per arm, one dot per seed (a colour per seed: the pairs), mean ± std bars, the
    baseline's mean dashed. Right: the paired deltas to the baseline per seed, mean ± the 95% t-interval.
    Returns the file name, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    arms, seeds = summary["arms"], summary["seeds"]
    names = [r["arm"].replace(":", ":\n").replace(",", ",\n") for r in arms]
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(max(7.0, 2.0 * len(arms) + 2), 3.8))
    for i, r in enumerate(arms):
        for k, v in enumerate(r["val_loss"]):
            if v is not None:
                ax.scatter([i], [v], s=18, color=f"C{k % 10}", alpha=0.8, zorder=3,
                           label=f"seed {seeds[k]}" if i == 0 else None)
        if math.isfinite(r["val_loss_mean"]):
            sd = r["val_loss_std"] if math.isfinite(r["val_loss_std"]) else 0.0
            ax.errorbar([i], [r["val_loss_mean"]], yerr=[sd], fmt="_", color="k", markersize=14, capsize=4)
        d = r["delta"]
        if d is not None and d["n"]:
            dx.scatter([i] * d["n"], d["deltas"], s=18, color="C0", alpha=0.6, zorder=3)
            hw = d["half_width"] if math.isfinite(d["half_width"]) else 0.0
            dx.errorbar([i], [d["mean"]], yerr=[hw], fmt="_", color="k", markersize=14, capsize=4)
    if math.isfinite(arms[0]["val_loss_mean"]):
        ax.axhline(arms[0]["val_loss_mean"], ls="--", lw=0.8, color="grey")
    dx.axhline(0.0, ls="--", lw=0.8, color="grey")
    for a, title in ((ax, "val loss per arm (bar: mean ± std)"),
                     (dx, f"paired Δ vs {summary['baseline']} (bar: mean ± 95% t-CI)")):
        a.set_xticks(range(len(arms)))
        a.set_xticklabels(names, fontsize=7)
        a.set_title(title, fontsize=9)
    ax.set_ylabel("validation loss")
    dx.set_ylabel("Δ validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def write_report(out: Path, summary: dict, cfg: TrainConfig, preset: str, elapsed: float,
                 plot: str | None) -> str:
    seeds = summary["seeds"]
    git = git_revision()
    per_run = markdown_table([
        {
            "arm": r["arm"],
            "seed": str(r["seed"]),
            "steps": "-" if r["steps"] is None else str(r["steps"]),
            "val loss": "diverged" if r.get("diverged") else "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}",
            "train loss (last step)": "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}",
            "wall time (s)": "-" if r["train_time"] is None else f"{r['train_time']:.2f}",
            "step time (s)": "-" if r["step_time"] is None else f"{r['step_time']:.3f}",
            "init from baseline (shared / re-aligned tensors)": (
                f"{r['pairing']['shared']} / {r['pairing']['realigned']}" if r.get("pairing") else "-"
            ),
        }
        for r in summary["runs"]
    ])
    arms = {a["scheme"] for a in summary["arms"]}
    owned = {k for k, owners in SCHEME_KEYS.items() if set(owners) & arms}
    cfg_lines = "\n".join(
        f"{k}: {json.dumps(v)}" for k, v in cfg.to_dict().items()
        if k not in ("residual", "seed") and (k not in SCHEME_KEYS or k in owned)
    )
    parts = [
        f"# AttnRes ablation: `{preset}` preset, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}, "
        f"baseline `{summary['baseline']}`",
        "",
        f"Every arm trained {cfg.max_steps} steps x {cfg.tokens_per_step:,} tokens "
        f"({cfg.max_steps * cfg.tokens_per_step:,} tokens) at one shape (hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers), seeds {', '.join(map(str, seeds))}. For each seed the arms see the "
        "same batches and start from the baseline's shared weights (same name and shape). Validation loss at "
        "the last step" + (f" over {cfg.eval_batches} batches" if cfg.eval_batches else " over the whole split")
        + "; mean ± std over seeds.",
        "",
        markdown_table(table_rows(summary)),
        "",
        f"- Δ: paired, arm minus baseline per seed, mean ± the 95% t-interval half-width t·sd/√n "
        f"(t quantile: {summary['t_source']}); n = {len(seeds)} pairs. With one seed there is no interval.",
        "- FLOPs/token: one training forward + backward of one micro-batch under "
        "`torch.utils.flop_counter.FlopCounterMode` (matmuls, attention), divided by its tokens; elementwise "
        "ops (norms, softmax over depth, the residual sums) are not counted, so cheap reads look free. The "
        "ratio is to the baseline's.",
        "- Wall time: the sum of the training step times of a run (evaluation excluded), mean ± std over "
        "seeds, and its ratio to the baseline's; on a shared CPU it is noisy, and the bandwidth-bound depth "
        "reads cost more than their FLOPs.",
        "- Pairing: before its first step, every weight of an arm that the baseline also has (same name and "
        "shape) is set to the baseline's initial value at that seed (\"re-aligned\" counts those that "
        "differed, e.g. where a scheme draws random numbers at init); the batches are the seed's.",
        "",
    ]
    if plot:
        parts += ["![val loss per arm](" + plot + ")", ""]
    parts += [
        "## Runs", "", per_run, "",
        "## Command", "", "```", summary.get("command", "attnres ablate"), "```", "",
        f"Wall time {elapsed / 60:.1f} min (this invocation).", "",
        "## Machine and versions", "",
        "\n".join(f"- {k}: {v}" for k, v in environment().items()),
        f"- git: {git['commit'][:12] + (' (dirty)' if git['dirty'] else '') if git else 'unknown'}", "",
        "## Shared config", "", "```yaml", cfg_lines, "```",
    ]
    text = "\n".join(parts).rstrip() + "\n"
    atomic_write_text(out / "report.md", text)
    return text


__all__ = [
    "ARM_SHARED_KEYS",
    "Arm",
    "ablate",
    "measure_flops",
    "paired_delta",
    "pairing_wrap",
    "parse_arm",
    "parse_arms",
    "print_table",
    "t_quantile",
    "table_rows",
]
