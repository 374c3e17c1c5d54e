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
from collections.abc import Callable, Sequence
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


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Time every function ``repeats`` times, one call of each per round, rotating the order per round.

    Interleaving makes slow drifts of a shared machine (other processes, frequency) hit every
    variant alike, so ratios taken within a round are fairer than ratios of separate runs.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(time_once(fns[name], device))
    return times


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
