"""The run directory: who may write into ``OUT``, and its files besides the checkpoint.

``metrics.jsonl`` (one JSON row per line, appended and flushed as rows come), ``run.json`` (what
ran: config, git revision, versions, seeds, command line, one entry per resume) and
``result.json`` (the summary :func:`summarize` makes of the rows). See :mod:`attnres.train.loop`.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, atomic_write_text, find_checkpoint
from .config import TrainConfig, UserError

RUN_FILES = ("metrics.jsonl", "run.json", "result.json")


class RunExistsError(UserError):
    """OUT already holds a run and neither resume nor overwrite was asked for."""


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume (``resume``), else None once ``out`` holds no run (``overwrite``
    removes one; without it an existing run is a :class:`RunExistsError`)."""
    ckpt = find_checkpoint(out) if out.exists() else None
    if resume:
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint to resume in {out}")
        return ckpt
    existing = [p for p in (*RUN_FILES, "checkpoint") if (out / p).exists()]
    if existing:
        if not overwrite:
            raise RunExistsError(
                f"{out} already holds a run ({', '.join(existing)}); use --resume to continue it "
                f"or --overwrite to replace it"
            )
        for name in (*RUN_FILES, "checkpoint", "checkpoint.old", "checkpoint.tmp"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return None


def discard_partial_run(out: Path, created: bool) -> None:
    """A fresh run that failed before its first checkpoint: remove what it wrote, so that neither a
    re-run ("already holds a run") nor ``--resume`` ("no checkpoint") is blocked by it."""
    if find_checkpoint(out) is not None:
        return
    for name in (*RUN_FILES, "checkpoint.tmp", "checkpoint.old"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    if created:
        try:
            out.rmdir()  # only if empty
        except OSError:
            pass


# ----------------------------------------------------------------------------- metrics.jsonl


class MetricsLog:
    """Appends rows to ``metrics.jsonl``, first cutting it back to ``truncate_to`` bytes (the length
    a resumed checkpoint recorded), so rows written after that checkpoint are dropped."""

    def __init__(self, path: Path, truncate_to: int | None = None):
        if truncate_to is not None and path.exists():
            with open(path, "r+b") as f:
                f.truncate(truncate_to)
        self.f = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def position(self) -> int:
        """The file's length with every row so far on disk: what a checkpoint records."""
        self.f.flush()
        os.fsync(self.f.fileno())
        return self.f.tell()

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoMetrics:
    """Where the rows of a rank that does not log go (every rank but 0 in a job of several)."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def position(self) -> int:
        return 0

    def __enter__(self) -> NoMetrics:
        return self

    def __exit__(self, *exc) -> None:
        pass


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a torn last line from a kill mid-write
    return rows


def last_probes(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    probes = [r for r in rows if "probes" in r]
    return probes[-1]["probes"] if probes else None


def summarize(cfg: TrainConfig, rows: list[dict[str, Any]], params: int, out: Path) -> dict[str, Any]:
    """The run summary from its metrics rows.

    ``step_time`` is the median over steps (the first 3 steps, which include one-off setup, are
    skipped when there are more than 6) and ``tokens_per_s = tokens_per_step / step_time``; the
    median keeps the figure honest on a shared machine.
    """
    train_rows = [r for r in rows if "train_loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    times = [r["step_time"] for r in train_rows]
    if len(times) > 6:
        times = times[3:]
    step_time = statistics.median(times) if times else None
    last_eval = eval_rows[-1] if eval_rows else {}
    return {
        "residual": cfg.residual,
        "seed": cfg.seed,
        "params": params,
        "steps": train_rows[-1]["step"] if train_rows else 0,
        "tokens": train_rows[-1]["tokens"] if train_rows else 0,
        "train_loss": train_rows[-1]["train_loss"] if train_rows else None,
        "val_loss": last_eval.get("val_loss"),
        "ppl": last_eval.get("ppl"),
        "bpb": last_eval.get("bpb"),
        "step_time": step_time,
        "tokens_per_s": cfg.tokens_per_step / step_time if step_time else None,
        "train_time": sum(r["step_time"] for r in train_rows),
        "out_dir": str(out),
    }


# ----------------------------------------------------------------------------- run.json


@functools.cache
def git_revision() -> dict[str, Any] | None:
    """HEAD and dirtiness at the first call: the code this process runs, even if the checkout changes later."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    import transformers

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "attnres": __version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_run_info(cfg: TrainConfig, model_config: dict[str, Any], params: int, data) -> dict[str, Any]:
    """``run.json`` of a fresh run: what ran, on what, with which seeds and data."""
    return {
        "config": cfg.to_dict(),
        "model_config": model_config,
        "params": params,
        "seeds": {"seed": cfg.seed, "data_order_seed": cfg.seed, "split_seed": cfg.split_seed},
        "git": git_revision(),
        "versions": environment(),
        "argv": sys.argv,
        "started": _now(),
        "data": {
            "dir": str(data.dir),
            "train_tokens": len(data.train),
            "val_tokens": len(data.val),
            "train_bytes": data.train_bytes,
            "val_bytes": data.val_bytes,
            "vocab": len(data.tokenizer),
        },
    }


def write_run_info(
    path: Path, cfg: TrainConfig, resumed_at: int | None, *, model_config: dict[str, Any], params: int, data
) -> None:
    """Write a fresh run's ``run.json``; on a resume (``resumed_at``: the step it starts from)
    append a ``resumes`` entry to the one already there (or write a fresh one if it is gone)."""
    if resumed_at is not None and path.exists():
        info = json.loads(path.read_text())
    else:
        info = new_run_info(cfg, model_config, params, data)
    if resumed_at is not None:
        info.setdefault("resumes", []).append(
            {"step": resumed_at, "argv": sys.argv, "config": cfg.to_dict(), "time": _now()}
        )
    atomic_write_text(path, json.dumps(info, indent=2, default=str) + "\n")
