"""Shared helpers: interleaved timing, machine info, results files and markdown tables."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds of one call of ``fn``, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def balanced_orders(n: int) -> list[list[int]]:
    """Williams' orders of ``range(n)``: ``n`` of them (``2n`` for odd ``n > 1``) in which every index takes
    every position equally often and directly follows every other index equally often.

    A rotated order keeps each variant's predecessor fixed; on CPU a step inherits the allocator's free
    memory from the step before it, so a fixed predecessor can bias a ratio.
    """
    if n < 1:
        raise ValueError(f"balanced_orders: n={n}, expected at least 1")
    first, lo, hi = [0], 1, n - 1
    while lo <= hi:
        first.append(lo)
        lo += 1
        if lo <= hi:
            first.append(hi)
            hi -= 1
    rows = [[(x + k) % n for x in first] for k in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 and n > 1 else rows


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    progress: Callable[[int, dict[str, float]], None] | None = None,
    group: Callable[[str], Hashable] | None = None,
) -> dict[str, list[float]]:
    """Time every function ``repeats`` times, one call of each per round, in ``balanced_orders`` order.

    Interleaving makes slow drifts of a shared machine (other processes, frequency) hit every
    variant alike, so ratios taken within a round are fairer than ratios of separate runs; the
    balanced orders give every variant every predecessor alike. ``group(name)``: names of one group
    run next to each other in a round (groups and the names within each in balanced order).
    ``progress(round, {name: seconds})`` is called after each round.
    """
    groups: dict[Hashable, list[str]] = {}
    for name in fns:
        groups.setdefault(group(name) if group else None, []).append(name)
    for _ in range(warmup):
        for name in fns:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for names in _permuted(list(groups.values()), r):
            for name in _permuted(names, r):
                times[name].append(time_once(fns[name], device))
        if progress is not None:
            progress(r, {name: times[name][-1] for name in fns})
    return times


def _permuted(items: list, r: int) -> list:
    """``items`` in round ``r``'s balanced order."""
    orders = balanced_orders(len(items)) if items else [[]]
    return [items[i] for i in orders[r % len(orders)]]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[i] / den[i] (both timed in the same round)."""
    return median([a / b for a, b in zip(num, den, strict=True) if b > 0])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(device: torch.device | str) -> dict:
    import attnres

    rev = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "mem_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "attnres": getattr(attnres, "__version__", "unknown"),
        "git_revision": rev,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "device": str(device),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside ``path`` and rename it over, so a result file is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def fmt(x, digits: int = 3) -> str:
    """Compact number for tables: None/NaN as a dash, 3 significant digits."""
    if x is None:
        return "-"
    if isinstance(x, bool) or isinstance(x, int | str):
        return str(x)
    if not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def machine_md(info: dict) -> str:
    keys = [
        "cpu_model",
        "cpu_cores",
        "torch_threads",
        "mem_total_gib",
        "gpu",
        "python",
        "torch",
        "transformers",
        "attnres",
        "git_revision",
        "git_dirty",
        "device",
        "command",
        "timestamp_utc",
    ]
    return md_table(["key", "value"], [(k, str(info[k])) for k in keys if k in info])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} asked for, but torch.cuda.is_available() is False")
    return dev


def reference_config_kwargs() -> dict:
    """The reference model of the benchmarks (and of PAPER §11's CPU runs): d=256 x 8 layers, N=8 blocks."""
    return dict(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=704,
    )


RESIDUALS = ("standard", "full", "block")
# --quick shrinks the model so the smoke run stays fast; the numbers of a quick run are not results.
QUICK_MODEL = dict(
    vocab_size=1024,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=176,
)


def model_kwargs(quick: bool) -> dict:
    return reference_config_kwargs() | (QUICK_MODEL if quick else {})


def build_model(residual: str, seed: int, device: torch.device, quick: bool = False):
    """The reference config with ``residual``, a scheme or an arm spec ``scheme[:key=value,...]`` (as
    ``attnres ablate`` takes them; scheme keys only); block uses S=2 sublayers (one decoder layer) = N=8 blocks."""
    from attnres import AttnResConfig, AttnResForCausalLM
    from attnres.train.ablate import parse_arm

    arm = parse_arm(residual)
    kw = model_kwargs(quick) | dict(arm.overrides)
    if arm.scheme == "block":
        kw.setdefault("attn_res_block_size", 2)
    torch.manual_seed(seed)
    return AttnResForCausalLM(AttnResConfig(residual=arm.scheme, **kw)).to(device)


# ---- shapes, dtypes and modes of the step/decode benchmarks (issue 13) --------------------------------------

DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # step: autocast dtype (None = off); decode: weight dtype
MODES = ("eager", "compiled")


def parse_choices(option: str, text: str, allowed: Sequence[str]) -> list[str]:
    """``a,b`` -> ['a', 'b'], each in ``allowed`` and once; else a one-line ``SystemExit`` naming what is allowed."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise SystemExit(f"{option}: give at least one of {', '.join(allowed)} (comma-separated), got {text!r}")
    for s in items:
        if s not in allowed:
            raise SystemExit(f"{option}: {s!r} is not one of {', '.join(allowed)}")
    if len(set(items)) != len(items):
        raise SystemExit(f"{option}: {text!r} names an entry twice")
    return items


def shape_model_kwargs(hidden: int, layers: int, quick: bool = False) -> dict:
    """Model of a benchmark shape: head dim 16 (hidden < 128), 32 (<= 256) or 64, half as many KV heads,
    MLP 2.75 x hidden, vocab 8192 (1024 with --quick). 256 x 8 is exactly the reference model."""
    head_dim = 16 if hidden < 128 else 32 if hidden <= 256 else 64
    heads = hidden // head_dim
    return dict(
        vocab_size=1024 if quick else 8192,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
        intermediate_size=hidden * 11 // 4,
    )


def parse_shapes(option: str, text: str, default_batch: int | None, fields: int = 3) -> list[dict]:
    """``HIDDENxLAYERSxSEQ[xBATCH],...`` (``fields`` = 3) or ``HIDDENxLAYERS,...`` (``fields`` = 2) -> a list of
    dicts; a one-line ``SystemExit`` naming the form and the limits on a bad entry."""
    names = ["hidden", "layers", "seq", "batch"][: fields + (1 if fields == 3 else 0)]
    form = "HIDDENxLAYERSxSEQ[xBATCH]" if fields == 3 else "HIDDENxLAYERS"
    shapes = []
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise SystemExit(f"{option}: give at least one shape {form} (comma-separated), got {text!r}")
    for item in items:
        parts = item.lower().split("x")
        if len(parts) not in (fields, len(names)) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"{option}: {item!r} is not {form} with positive integers (e.g. 768x12"
                             f"{'x512 or 768x12x512x2' if fields == 3 else ''})")
        shape = dict(zip(names, map(int, parts), strict=False))
        if shape["hidden"] % 64:
            raise SystemExit(f"{option}: {item!r}: hidden size must be a multiple of 64, got {shape['hidden']}")
        if fields == 3:
            shape.setdefault("batch", default_batch)
        shapes.append(shape)
    labels = [shape_label(s) for s in shapes]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"{option}: {text!r} names a shape twice")
    return shapes


def shape_label(shape: dict) -> str:
    label = f"d{shape['hidden']}xL{shape['layers']}"
    if "seq" in shape:
        label += f" {shape['batch']}x{shape['seq']}"
    return label


def build_arm_model(scheme: str, overrides: dict, shape: dict, seed: int, device: torch.device,
                    quick: bool = False, num_blocks: int = 8):
    """``AttnResForCausalLM`` of ``shape`` with ``residual=scheme`` and config ``overrides``; Block gets
    N = ``num_blocks`` blocks unless the overrides set its size (at 256 x 8, N = 8 is S = 2, the reference)."""
    from attnres import AttnResConfig, AttnResForCausalLM

    kw = shape_model_kwargs(shape["hidden"], shape["layers"], quick) | dict(overrides)
    if scheme == "block" and not {"attn_res_block_size", "attn_res_block_layers"} & set(overrides):
        kw.setdefault("attn_res_num_blocks", num_blocks)
    torch.manual_seed(seed)
    config = AttnResConfig(residual=scheme, **kw)
    return AttnResForCausalLM(config).to(device), kw | {"residual": scheme, "block_size": config.block_size}


def spread(xs: Sequence[float]) -> tuple[float, float]:
    return (min(xs), max(xs)) if xs else (math.nan, math.nan)


def median_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``xs`` (order statistics x_(k), x_(n+1-k) with the
    largest k whose binomial coverage is still >= ``level``); (nan, nan) with fewer than 6 values, where no
    pair of order statistics reaches 95 %."""
    n = len(xs)
    k = 0
    for j in range(1, n // 2 + 1):  # P(x_(j) <= median <= x_(n+1-j)) = 1 - 2 P(Binom(n, 1/2) < j)
        if 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n < level:
            break
        k = j
    if k == 0:
        return (math.nan, math.nan)
    ys = sorted(xs)
    return (ys[k - 1], ys[n - k])


def interval_text(interval) -> str:
    """' ci lo–hi' for a table cell, '' when there is no interval (fewer than 6 rounds, or an older JSON)."""
    return "" if not interval or math.isnan(interval[0]) else f" ci {interval[0]:.3f}–{interval[1]:.3f}"


def verdict(value: float, target: float | None, interval: tuple[float, float]) -> str:
    """'met' / 'missed' by the median against ``target``, 'unresolved' added when the interval holds it."""
    if target is None or value is None:
        return ""
    word = "met" if value <= target else "missed"
    lo, hi = interval
    return word + (" (unresolved)" if lo <= target <= hi else "")
