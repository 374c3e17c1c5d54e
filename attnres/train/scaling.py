"""``attnres scaling``: a ladder of budgets and a ladder of model sizes, per scheme, K paired seeds; power-law
fits and each scheme's compute multiplier against the baseline (ZOO.md §5).

**Budgets.** One WSD run per (size, arm, seed) gives every budget rung: it trains at constant lr after
warmup to the top rung T_k (the last ``decay_fraction`` of it decaying); for each lower rung T_r, a copy
of the run taken at T_r - round(f T_r) (the same step in the constant phase) decays over the rest of T_r
(a cooldown branch: ``train(stop_at=)`` then a resume of the copy with ``max_steps = T_r``). The batches of
step s are the same in every branch, so a branch is the run a WSD schedule of length T_r would have made.

**Sizes.** ``HIDDEN`` or ``HIDDENxLAYERS``: the shared config with that width (and depth), the MLP scaled
by the config's ``intermediate_size / hidden_size`` (rounded to a multiple of 8), heads unchanged.

**Compute.** C = FLOPs/token x tokens, the FLOPs of one training forward + backward measured per (size,
arm) with :class:`torch.utils.flop_counter.FlopCounterMode` (``OUT/flops.json``; elementwise ops such as
the depth softmax are not counted). Each arm's points (every size and rung) are fitted with
:func:`attnres.analysis.scaling_law.power_law`; the multiplier of an arm is m = C_base*(L) / C at its
points, C_base* inverting the baseline's fit, one ln m per seed (the baseline's fit of that seed, the
arm's points of that seed; pairs share init and data), mean ± t-interval over seeds. Points whose C_base*
lies outside the baseline's fitted range are extrapolations: flagged, counted, left out. Also reported:
the shared-alpha and shared-floor fits (:func:`~attnres.analysis.scaling_law.floor_fit`), the multiplier
at each size alone (a token ladder at a fixed size), and leave-one-rung-out refits.

Layout: ``OUT/<size>/<arm label>-s<seed>/rung-<T>/`` (a run directory each; the top rung is the main
run), ``OUT/flops.json``, ``OUT/summary.json``, ``OUT/report.md``, ``OUT/scaling.png``. Finished rungs are
skipped; an interrupted unit continues where its checkpoints are (a second invocation with the same
arguments). Checkpoints are deleted once a unit is done unless ``keep_checkpoints``. ``jobs`` > 1 trains
units in that many worker processes (each ``num_threads`` threads).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..analysis import scaling_law as law
from .ablate import Arm, _fingerprint, _finite, _say, measure_flops, pairing_wrap, parse_arms, t_quantile
from .checkpoint import atomic_write_text, find_checkpoint, load_trainer_state
from .config import SCHEME_KEYS, ConfigError, TrainConfig, check_scheme_keys, config_diff, config_from_dict
from .loop import environment, git_revision, prepare, train

UNIT_FILE = "unit.json"
SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:x\s*(\d+))?\s*$")


@dataclass(frozen=True)
class Size:
    """A model size: hidden width and number of decoder layers."""

    hidden: int
    layers: int

    @property
    def label(self) -> str:
        return f"d{self.hidden}x{self.layers}"

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        mlp = max(8, round(cfg.intermediate_size / cfg.hidden_size * self.hidden / 8) * 8)
        return replace(cfg, hidden_size=self.hidden, num_hidden_layers=self.layers, intermediate_size=mlp)


def parse_size(text: str, layers: int) -> Size:
    """``HIDDEN`` (``layers`` decoder layers) or ``HIDDENxLAYERS``."""
    m = SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"size {text!r}: expected HIDDEN or HIDDENxLAYERS, e.g. 128 or 128x8")
    size = Size(int(m.group(1)), int(m.group(2)) if m.group(2) else layers)
    if size.hidden < 1 or size.layers < 1:
        raise ConfigError(f"size {text!r}: hidden size and layers must be >= 1")
    return size


@dataclass(frozen=True)
class Ladder:
    """Budget rungs in optimizer steps (ascending) and the WSD decay fraction of each."""

    rungs: tuple[int, ...]
    decay_fraction: float

    @property
    def top(self) -> int:
        return self.rungs[-1]

    def branch_point(self, steps: int) -> int:
        """The step at which the rung of ``steps`` leaves the constant phase."""
        return steps - max(1, round(self.decay_fraction * steps))

    def check(self, warmup: int) -> Ladder:
        r = self.rungs
        if not r or any(s < 2 for s in r) or list(r) != sorted(set(r)):
            raise ConfigError(f"rungs must be distinct step counts >= 2, ascending, got {list(r)}")
        if not 0 < self.decay_fraction < 1:
            raise ConfigError(f"decay fraction must be in (0, 1), got {self.decay_fraction}")
        if warmup >= self.branch_point(r[0]):
            raise ConfigError(
                f"warmup_steps={warmup} must end before the first cooldown starts (step "
                f"{self.branch_point(r[0])} of the {r[0]}-step rung); lower warmup_steps or raise the rungs"
            )
        return self


# ----------------------------------------------------------------------------- one unit: (size, arm, seed)


def unit_config(cfg: TrainConfig, size: Size, arm: Arm, seed: int, ladder: Ladder) -> TrainConfig:
    """The main run's config: WSD to the top rung, evaluated at each rung's end only."""
    c = arm.config(size.apply(cfg), seed)
    return replace(c, schedule="wsd", decay_fraction=ladder.decay_fraction, max_steps=ladder.top,
                   eval_every=ladder.top).validate()


def _finished(run: Path, steps: int) -> dict[str, Any] | None:
    try:
        r = json.loads((run / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return r if r.get("steps") == steps else None


def _step(run: Path) -> int:
    ckpt = find_checkpoint(run) if run.exists() else None
    return int(load_trainer_state(ckpt)["step"]) if ckpt is not None else 0


def _check_unit(unit: Path, cfg: TrainConfig) -> None:
    """A unit directory trained with another config is refused (``overwrite`` replaces it)."""
    path = unit / UNIT_FILE
    if path.is_file():
        saved = config_from_dict(json.loads(path.read_text())["config"])
        diff = config_diff(saved, cfg)
        if diff:
            raise ConfigError(
                f"{unit} was trained with another config ("
                + "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
                + "); use another --out, or --overwrite"
            )
    unit.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"config": cfg.to_dict()}, indent=2) + "\n")


def _copy_run(src: Path, dst: Path) -> None:
    """``src`` (its checkpoint, metrics and records, not its result) as a new run directory ``dst``."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("result.json", "checkpoint.old", "checkpoint.tmp"))
    tmp.rename(dst)


def _advance_main(cfg: TrainConfig, main: Path, to: int, run_kw: dict, wrap) -> None:
    """Train the main run up to step ``to`` (a checkpoint there)."""
    at = _step(main)
    if at > to:
        raise ConfigError(f"{main} is at step {at}, past step {to} where a missing rung branches off; its "
                          "checkpoint cannot go back: rerun with --overwrite")
    if at < to or to == cfg.max_steps:  # the top rung: also when only its result.json is missing
        fresh = at == 0
        train(cfg, main, resume=not fresh, overwrite=fresh, wrap=wrap if fresh else None,
              stop_at=None if to == cfg.max_steps else to, **run_kw)


def run_unit(cfg: TrainConfig, ladder: Ladder, unit: Path, *, data, wrap=None, progress: bool = False,
             label: str = "", keep_checkpoints: bool = False) -> dict[int, dict[str, Any]]:
    """Every rung of one (size, arm, seed): {steps: result}. Resumes what an earlier call left."""
    _check_unit(unit, cfg)
    main = unit / f"rung-{ladder.top}"
    results: dict[int, dict[str, Any]] = {}
    for steps in ladder.rungs:
        run = unit / f"rung-{steps}"
        done = _finished(run, steps)
        if done is None:
            kw = dict(data=data, progress=progress, label=f"{label} rung {steps}")
            if steps == ladder.top:
                _advance_main(cfg, main, steps, kw, wrap)
            else:
                if not run.exists():
                    _advance_main(cfg, main, ladder.branch_point(steps), kw, wrap)
                    _copy_run(main, run)
                train(replace(cfg, max_steps=steps), run, resume=True, **kw)
            done = _finished(run, steps)
            if not keep_checkpoints and steps != ladder.top:
                _drop_checkpoints(run)
        results[steps] = done
    if not keep_checkpoints:
        _drop_checkpoints(main)
    return results


def _drop_checkpoints(run: Path) -> None:
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
        shutil.rmtree(run / name, ignore_errors=True)


def _worker(job: dict[str, Any]) -> tuple[str, dict[int, dict[str, Any]]]:
    """A unit in a worker process (``jobs`` > 1): the data come from the on-disk cache."""
    cfg = config_from_dict(job["cfg"])
    data = prepare(cfg, False)
    ladder = Ladder(tuple(job["rungs"]), job["decay_fraction"])
    return job["key"], run_unit(cfg, ladder, Path(job["unit"]), data=data, wrap=_pairing(job, data),
                                label=job["key"], keep_checkpoints=job["keep"])


def _pairing(job: dict[str, Any], data):
    """The ``train(wrap=)`` that gives a non-baseline unit the baseline's initial shared weights."""
    if job["base"] is None:
        return None
    return pairing_wrap(config_from_dict(job["base"]), len(data.tokenizer), Path(job["unit"]) / "pairing.json",
                        job["base_spec"])


# ----------------------------------------------------------------------------- the study


@dataclass
class Study:
    """What ``scaling`` trains: every (size, arm, seed) unit on one ladder."""

    cfg: TrainConfig
    base: Arm
    arms: list[Arm]
    sizes: list[Size]
    seeds: list[int]
    ladder: Ladder

    def units(self) -> list[tuple[int, Size, Arm]]:
        """Seeds outer, so that an early stop leaves whole seeds."""
        return [(s, z, a) for s in self.seeds for z in self.sizes for a in self.arms]

    def config(self, size: Size, arm: Arm, seed: int) -> TrainConfig:
        try:
            return unit_config(self.cfg, size, arm, seed, self.ladder)
        except ConfigError as e:
            raise ConfigError(f"size {size.label}, arm {arm.spec!r}: {e}") from None

    @staticmethod
    def key(size: Size, arm: Arm, seed: int) -> str:
        return f"{size.label}/{arm.label}-s{seed}"


def _flops(out: Path, study: Study, vocab: int) -> dict[str, dict[str, Any]]:
    """'<size>/<arm spec>' -> {flops_per_token, params}, measured once and kept in ``OUT/flops.json``."""
    path = out / "flops.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    res = {}
    for z in study.sizes:
        for a in study.arms:
            cfg = study.config(z, a, 0)
            key, fp = f"{z.label}/{a.spec}", _fingerprint(cfg, vocab)
            hit = cache.get(key)
            if not (isinstance(hit, dict) and hit.get("fingerprint") == fp):
                hit = {**measure_flops(cfg, vocab), "fingerprint": fp}
            res[key] = hit
    atomic_write_text(path, json.dumps(res, indent=2) + "\n")
    return res


def _jobs(out: Path, study: Study) -> list[dict[str, Any]]:
    jobs = []
    for s, z, a in study.units():
        base = None if a == study.base else study.config(z, study.base, s).to_dict()
        jobs.append({
            "key": Study.key(z, a, s), "cfg": study.config(z, a, s).to_dict(), "base": base,
            "base_spec": study.base.spec, "unit": str(out / z.label / f"{a.label}-s{s}"),
            "rungs": list(study.ladder.rungs), "decay_fraction": study.ladder.decay_fraction,
        })
    return jobs


def _train_units(out: Path, study: Study, data, jobs: int, progress: bool, keep: bool) -> dict[str, dict]:
    todo = _jobs(out, study)
    for j in todo:
        j["keep"] = keep
    results: dict[str, dict] = {}
    if jobs <= 1:
        for i, j in enumerate(todo):
            if progress:
                _say(f"[{i + 1}/{len(todo)}] {j['key']}")
            results[j["key"]] = run_unit(config_from_dict(j["cfg"]), study.ladder, Path(j["unit"]), data=data,
                                         wrap=_pairing(j, data), progress=progress, label=j["key"],
                                         keep_checkpoints=keep)
        return results
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, j) for j in todo]
        for i, f in enumerate(cf.as_completed(futures)):
            key, res = f.result()
            results[key] = res
            if progress:
                _say(f"[{i + 1}/{len(todo)}] {key}: " + ", ".join(
                    f"{t}: {r['val_loss']:.4f}" for t, r in res.items() if r and r.get("val_loss") is not None))
    return results


def scaling(
    cfg: TrainConfig,
    out_dir: str | Path,
    arms,
    *,
    sizes: list[str],
    rungs: list[int],
    baseline: str | Arm = "standard",
    seeds: list[int] | None = None,
    decay_fraction: float = 0.2,
    jobs: int = 1,
    overwrite: bool = False,
    keep_checkpoints: bool = False,
    progress: bool = True,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Train every (size, arm, seed) unit on the ladder of ``rungs`` into ``out_dir``, fit, write
    summary.json, report.md and scaling.png; returns the summary. Everything is checked first."""
    out = Path(out_dir)
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    if not seeds:
        raise ConfigError("scaling needs at least one seed")
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    if not sizes:
        raise ConfigError("scaling needs at least one size, e.g. 64,96,128")
    base, arm_list = parse_arms(arms, baseline)
    check_scheme_keys(cfg, SCHEME_KEYS, [a.scheme for a in arm_list])
    study = Study(cfg, base, arm_list, [parse_size(s, cfg.num_hidden_layers) for s in sizes], seeds,
                  Ladder(tuple(int(r) for r in rungs), decay_fraction).check(cfg.warmup_steps))
    if len({z.label for z in study.sizes}) != len(study.sizes):
        raise ConfigError(f"a size is given twice: {', '.join(z.label for z in study.sizes)}")
    for s, z, a in study.units():
        study.config(z, a, s)
    if overwrite and out.exists():
        for z in study.sizes:
            shutil.rmtree(out / z.label, ignore_errors=True)
    t0 = time.time()
    data = prepare(cfg, progress)
    vocab = len(data.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    flops = _flops(out, study, vocab)
    results = _train_units(out, study, data, jobs, progress, keep_checkpoints)
    summary = summarize(study, results, flops)
    summary.update(vocab_size=vocab, command="attnres " + shlex.join(list(sys.argv[1:] if argv is None else argv)))
    atomic_write_text(out / "summary.json", json.dumps(_finite(summary), indent=2) + "\n")
    plot = plot_scaling(summary, out / "scaling.png")
    write_report(out, summary, study, time.time() - t0, plot)
    return summary


# ----------------------------------------------------------------------------- analysis


def collect_points(study: Study, results: dict[str, dict], flops: dict) -> list[dict[str, Any]]:
    """One row per (size, arm, seed, rung): tokens, compute C (FLOPs), final val loss, training time."""
    tps = study.cfg.tokens_per_step
    rows = []
    for s, z, a in study.units():
        fpt = flops[f"{z.label}/{a.spec}"]["flops_per_token"]
        for steps, r in sorted(results[Study.key(z, a, s)].items()):
            loss = r.get("val_loss") if r else None
            rows.append({"size": z.label, "arm": a.spec, "seed": s, "steps": steps, "tokens": steps * tps,
                         "compute": fpt * steps * tps, "val_loss": loss,
                         "train_time": r.get("train_time") if r else None})
    return rows


def _xy(points, arm: str, seed: int | None = None, size: str | None = None, drop: int | None = None):
    """(C, L) of ``arm``'s points (one seed's, or the mean over seeds where every seed has the point)."""
    sel = [p for p in points if p["arm"] == arm and (size is None or p["size"] == size)
           and (drop is None or p["steps"] != drop)]
    groups: dict[tuple[str, int], list[dict]] = {}
    for p in sel:
        groups.setdefault((p["size"], p["steps"]), []).append(p)
    c, y = [], []
    for ps in groups.values():
        ps = [p for p in ps if seed is None or p["seed"] == seed]
        losses = [p["val_loss"] for p in ps]
        if ps and all(v is not None and math.isfinite(v) for v in losses):
            c.append(ps[0]["compute"])
            y.append(sum(losses) / len(losses))
    return c, y


def _fit(c, y) -> law.PowerLaw | None:
    try:
        return law.power_law(c, y)
    except ValueError:
        return None


def paired_multiplier(points, base: str, arm: str, seeds: list[int], **where) -> dict[str, Any]:
    """One ln m per seed (that seed's baseline fit inverted at that seed's arm points), t-interval over seeds."""
    per_seed, extrapolated, interpolated = [], 0, 0
    for s in seeds:
        bfit = _fit(*_xy(points, base, seed=s, **where))
        c, y = _xy(points, arm, seed=s, **where)
        if bfit is None or not c:
            continue
        m = law.multiplier(bfit, c, y)
        extrapolated += m["extrapolated"]
        interpolated += m["interpolated"]
        if m["ln_m"] is not None:
            per_seed.append(m["ln_m"])
    ci = law.t_interval(per_seed, t_quantile)
    return {**ci, "per_seed": [math.exp(x) for x in per_seed], "interpolated_points": interpolated,
            "extrapolated_points": extrapolated}


def summarize(study: Study, results: dict[str, dict], flops: dict) -> dict[str, Any]:
    points = collect_points(study, results, flops)
    base, names = study.base.spec, [a.spec for a in study.arms]
    groups = {a: _xy(points, a) for a in names}
    fits = {a: (f.to_dict() if (f := _fit(*groups[a])) else None) for a in names}
    pooled = {a: g for a, g in groups.items() if len(g[0]) >= 2}
    shared = law.shared_alpha(pooled) if len(pooled) == len(names) else None
    floor = law.floor_fit(pooled) if len(pooled) == len(names) else None
    mult = {}
    for a in names[1:]:
        mult[a] = {
            "paired": paired_multiplier(points, base, a, study.seeds),
            "shared_alpha": law.shared_multiplier(shared, base, a) if shared else None,
            "shared_floor": law.shared_multiplier(floor, base, a) if floor and floor["A"] else None,
            "per_size": {z.label: paired_multiplier(points, base, a, study.seeds, size=z.label)
                         for z in study.sizes if len(study.ladder.rungs) >= 2},
            "leave_one_rung_out": {r: paired_multiplier(points, base, a, study.seeds, drop=r)["m"]
                                   for r in study.ladder.rungs} if len(study.ladder.rungs) > 2 else {},
        }
    return {
        "baseline": base, "arms": names, "sizes": [z.label for z in study.sizes], "seeds": study.seeds,
        "rungs": list(study.ladder.rungs), "decay_fraction": study.ladder.decay_fraction,
        "tokens_per_step": study.cfg.tokens_per_step, "t_source": t_quantile(max(1, len(study.seeds) - 1))[1],
        "flops": {k: {"flops_per_token": v["flops_per_token"], "params": v["params"]} for k, v in flops.items()},
        "points": points, "fits": fits, "shared_alpha": shared, "floor": floor, "multipliers": mult,
    }


# ----------------------------------------------------------------------------- report


def plot_scaling(summary: dict, path: Path) -> str | None:
    """Log-log val loss against training compute: seed means (mean ± std) per arm, a marker per size, the
    arms' power-law fits as lines. Returns the file name, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    markers = "os^vD<>pP*"
    for i, arm in enumerate(summary["arms"]):
        for j, size in enumerate(summary["sizes"]):
            for steps in summary["rungs"]:
                ps = [p for p in summary["points"] if p["arm"] == arm and p["size"] == size and p["steps"] == steps
                      and p["val_loss"] is not None]
                if not ps:
                    continue
                ys = [p["val_loss"] for p in ps]
                mean = sum(ys) / len(ys)
                sd = (sum((y - mean) ** 2 for y in ys) / (len(ys) - 1)) ** 0.5 if len(ys) > 1 else 0.0
                ax.errorbar([ps[0]["compute"]], [mean], yerr=[sd], fmt=markers[j % len(markers)], color=f"C{i}",
                            ms=5, capsize=2, label=f"{arm}, {size}" if steps == summary["rungs"][0] else None)
        fit = summary["fits"].get(arm)
        if fit:
            c = np.geomspace(fit["c_min"], fit["c_max"], 50)
            ax.plot(c, fit["A"] * c ** -fit["alpha"], color=f"C{i}", lw=1,
                    label=f"{arm}: L = {fit['A']:.3g} C^-{fit['alpha']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs, FlopCounterMode)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"scaling: {len(summary['seeds'])} seeds, rungs {summary['rungs']} steps", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _f(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _ci(m: dict) -> str:
    if m.get("m") is None:
        return "- (no interpolated point)"
    if m.get("lo") is None:
        return f"{m['m']:.3f} (one seed)"
    return f"{m['m']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def loss_table(summary: dict) -> str:
    from .ablate import markdown_table

    rows = []
    for size in summary["sizes"]:
        for steps in summary["rungs"]:
            row = {"size": size, "steps": str(steps), "tokens": f"{steps * summary['tokens_per_step']:,}"}
            for arm in summary["arms"]:
                ys = [p["val_loss"] for p in summary["points"] if p["arm"] == arm and p["size"] == size
                      and p["steps"] == steps and p["val_loss"] is not None]
                mean = sum(ys) / len(ys) if ys else None
                sd = (sum((y - mean) ** 2 for y in ys) / (len(ys) - 1)) ** 0.5 if len(ys) > 1 else None
                row[arm] = "-" if mean is None else f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
            rows.append(row)
    return markdown_table(rows)


def multiplier_table(summary: dict) -> str:
    from .ablate import markdown_table

    rows = []
    for arm, m in summary["multipliers"].items():
        p = m["paired"]
        loro = [v for v in m["leave_one_rung_out"].values() if v is not None]
        rows.append({
            "arm": arm,
            "m, paired seeds (95% t-CI)": _ci(p),
            "per seed": ", ".join(f"{x:.3f}" for x in p["per_seed"]) or "-",
            "points interpolated / extrapolated": f"{p['interpolated_points']} / {p['extrapolated_points']}",
            "m, shared alpha": _f(m["shared_alpha"], ".3f"),
            "m, shared alpha + floor": _f(m["shared_floor"], ".3f"),
            "leave one rung out (min-max)": f"{min(loro):.3f}-{max(loro):.3f}" if loro else "-",
            **{f"m at {size} alone": _ci(v) for size, v in m["per_size"].items()},
        })
    return markdown_table(rows)


def fit_lines(summary: dict) -> list[str]:
    lines = []
    for arm, f in summary["fits"].items():
        lines.append(f"- `{arm}`: " + ("no fit" if not f else f"L = {f['A']:.4g} · C^-{f['alpha']:.4f} over "
                     f"{f['n']} points, C {f['c_min']:.3g}-{f['c_max']:.3g} ({f['c_max'] / f['c_min']:.1f}x), "
                     f"rms log residual {f['rmse_log']:.4f}"))
    s, fl = summary["shared_alpha"], summary["floor"]
    if s:
        lines.append(f"- shared alpha: {s['alpha']:.4f} (rms log residual {s['rmse_log']:.4f})")
    if fl and fl["alpha"] is not None:
        lines.append(f"- shared floor: L = {fl['E']:.4f} + A_s C^-{fl['alpha']:.3f} (rms log residual "
                     f"{fl['rmse_log']:.4f}); identified: {'yes' if fl['identified'] else 'no'} ({fl['why']})")
    elif fl:
        lines.append(f"- shared floor: not fitted ({fl['why']})")
    return lines


def write_report(out: Path, summary: dict, study: Study, elapsed: float, plot: str | None) -> str:
    cfg, git = study.cfg, git_revision()
    flops = "\n".join(f"- {k}: {v['flops_per_token'] / 1e6:.2f} MFLOP/token, {v['params']:,} params"
                      for k, v in summary["flops"].items())
    parts = [
        f"# Scaling: {', '.join(summary['arms'])} over sizes {', '.join(summary['sizes'])} and "
        f"{len(summary['rungs'])} budget rungs, {len(summary['seeds'])} paired seed"
        + ("s" if len(summary["seeds"]) > 1 else ""),
        "",
        f"WSD (warmup {cfg.warmup_steps} steps, constant lr {cfg.lr:g}, linear decay over the last "
        f"{summary['decay_fraction']:.0%} of each rung to {cfg.min_lr_ratio:g}x) with cooldown branches; rungs "
        f"{', '.join(map(str, summary['rungs']))} steps x {summary['tokens_per_step']:,} tokens. Validation loss "
        f"at each rung's end over {cfg.eval_batches} batches; mean ± std over seeds "
        f"{', '.join(map(str, summary['seeds']))}. Arms of a seed share the baseline's initial shared weights "
        "and the data order.",
        "",
        "## Validation loss", "", loss_table(summary), "",
        "## Power-law fits (seed means, every size and rung of an arm)", "", *fit_lines(summary), "",
        f"## Compute multiplier against `{summary['baseline']}`", "",
        multiplier_table(summary), "",
        "- m = C_base*(L) / C at an arm's points, C_base* inverting the baseline's power law; one ln m per seed "
        "(mean over that seed's interpolated points), then mean ± t_{0.975,n-1}·sd/√n over seeds "
        f"({summary['t_source']}), exponentiated. m > 1: the arm reaches the baseline's loss with 1/m of its "
        "compute.",
        "- Extrapolated points (C_base* outside the baseline's fitted compute range) are counted and left out; "
        "when every point of an arm extrapolates there is no multiplier.",
        "- Shared alpha / floor: one alpha (and one floor E) for all arms, m = (A_base/A_arm)^(1/alpha).",
        "- At a size alone: a token ladder at fixed size; not comparable with the paper's across-size figure.",
        "",
    ]
    if plot:
        parts += [f"![scaling]({plot})", ""]
    parts += [
        "## FLOPs (one training forward + backward, FlopCounterMode)", "", flops, "",
        "## Command", "", "```", summary.get("command", "attnres scaling"), "```", "",
        f"Wall time {elapsed / 60:.1f} min (this invocation).", "",
        "## Machine and versions", "", "\n".join(f"- {k}: {v}" for k, v in environment().items()),
        f"- git: {git['commit'][:12] + (' (dirty)' if git['dirty'] else '') if git else 'unknown'}", "",
        "## Shared config", "", "```yaml",
        "\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.to_dict().items() if k not in SCHEME_KEYS), "```",
    ]
    text = "\n".join(parts).rstrip() + "\n"
    atomic_write_text(out / "report.md", text)
    return text


__all__ = ["Ladder", "Size", "Study", "collect_points", "paired_multiplier", "parse_size", "run_unit", "scaling",
           "summarize"]
