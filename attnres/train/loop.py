"""The training loop: one model, one run directory.

``OUT/`` after a run::

    run.json          resolved config, git revision, versions, seeds, command line (+ resumes)
    metrics.jsonl     one JSON row per line: train rows {step, train_loss, lr, tokens, step_time,
                      grad_norm}, eval rows {step, val_loss, ppl, bpb, val_tokens}, probe rows
                      {step, probes} (attnres.analysis.collect_probes) when probes are on
    checkpoint/       the latest checkpoint (see checkpoint.py)
    result.json       the summary returned by :func:`train`

Exactness: the batch of step ``s`` is ``Batches(train, B, T, seed).get(s * grad_accum + micro)``, so
a resumed run sees the same data; optimizer/scheduler/RNG states are restored and ``metrics.jsonl``
is cut back to its length at the checkpoint. A run killed after a checkpoint and resumed ends on
the same losses as an uninterrupted one.

Stopping: SIGINT/SIGTERM finish the current step, save a checkpoint and raise
:class:`TrainingInterrupted`. A non-finite loss or gradient norm raises :class:`NonFiniteLoss`
without writing a checkpoint, so the last good one (if any) stays; a fresh run that fails before
its first checkpoint removes the files it wrote.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    find_checkpoint,
    load_model,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, TrainConfig, UserError, config_diff, config_from_dict
from .evaluate import autocast, evaluate
from .optim import build_optimizers, build_schedulers

# keys that may change when resuming (they do not change what the model computes at a given step,
# except max_steps, which also stretches the schedule)
RESUMABLE_KEYS = {
    "max_steps",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "probes",
    "probe_batch_size",
    "data_dir",
    "num_threads",
}
RUN_FILES = ("metrics.jsonl", "run.json", "result.json")


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: a checkpoint was saved at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved to "
            f"{checkpoint}; continue with --resume"
        )


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf; no checkpoint was written for this step."""


class RunExistsError(UserError):
    """OUT already holds a run and neither resume nor overwrite was asked for."""


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


class _Metrics:
    def __init__(self, path: Path, truncate_to: int | None):
        if truncate_to is not None and path.exists():
            with open(path, "r+b") as f:
                f.truncate(truncate_to)
        self.f = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def position(self) -> int:
        self.f.flush()
        os.fsync(self.f.fileno())
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


class _SignalGuard:
    """Turn SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class _Progress:
    """A rich progress bar (loss, tokens/s, ETA) on a TTY; plain lines at evaluations otherwise."""

    def __init__(self, enabled: bool, total: int, start: int, label: str):
        from rich.console import Console

        self.enabled = enabled
        self.console = Console(stderr=True)
        self.bar = None
        self.label = label
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.bar.add_task(label, total=total, completed=start, loss="-", tps="-")
            self.bar.start()

    def step(self, step: int, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")

    def log(self, msg: str) -> None:
        if self.enabled:
            self.console.print(f"{self.label}: {msg}" if self.bar is None else msg, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> Path | None:
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


def saved_config(out_dir: str | Path) -> TrainConfig:
    """The config of the run whose checkpoint is in ``out_dir``."""
    ckpt = find_checkpoint(out_dir) if Path(out_dir).exists() else None
    if ckpt is None:
        raise CheckpointError(f"--resume: no checkpoint to resume in {out_dir}")
    return config_from_dict(load_trainer_state(ckpt)["train_config"])


def prepare(cfg: TrainConfig, progress: bool = True):
    from ..data import prepare_data

    return prepare_data(
        cfg.data_dir,
        sources=tuple(cfg.sources),
        tokenizer=cfg.tokenizer,
        vocab_size=cfg.vocab_size,
        val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed,
        progress=progress,
    )


# ----------------------------------------------------------------------------- the loop


def _restores_threads(fn):
    """``cfg.num_threads`` applies for one run only: restore the caller's torch thread count."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def _discard_partial_run(out: Path, created: bool) -> None:
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


@_restores_threads
def train(
    cfg: TrainConfig | None,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    *,
    overwrite: bool = False,
    data=None,
    label: str | None = None,
) -> dict[str, Any]:
    """Train one model into ``out_dir``; returns (and writes to ``OUT/result.json``) the summary.

    ``cfg=None`` with ``resume=True`` continues with the checkpoint's own config. ``data``: an
    already prepared :class:`attnres.data.TokenData` (``compare`` prepares once for all arms).
    ``cfg.num_threads`` applies for the run only; the caller's torch thread count is restored.
    A fresh run that fails before its first checkpoint leaves no partial run files behind.
    """
    fresh: list[tuple[Path, bool]] = []  # (out, created) once a fresh run starts writing into out
    try:
        return _train(cfg, out_dir, resume, progress, overwrite, data, label, fresh)
    except BaseException as e:
        if fresh and not isinstance(e, TrainingInterrupted):
            _discard_partial_run(*fresh[0])
        raise


def check_resumable(saved: TrainConfig, cfg: TrainConfig) -> None:
    """Raise ConfigError if ``cfg`` changes a key of a saved run that may not change on resume."""
    diff = {k: v for k, v in config_diff(saved, cfg).items() if k not in RESUMABLE_KEYS}
    if diff:
        raise ConfigError(
            "cannot resume with a different config: "
            + "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        )


def _train(cfg, out_dir, resume, progress, overwrite, data, label, fresh) -> dict[str, Any]:
    from ..data import Batches
    from ..models import AttnResForCausalLM

    out = Path(out_dir)
    ckpt = _check_out_dir(out, resume, overwrite)
    state = load_trainer_state(ckpt) if ckpt is not None else None
    if state is not None:
        saved = config_from_dict(state["train_config"])
        if cfg is None:
            cfg = saved
        check_resumable(saved, cfg)
        if state["step"] > cfg.max_steps:
            raise ConfigError(
                f"--resume: the run in {out} is already at step {state['step']}, past max_steps="
                f"{cfg.max_steps}; give --max-steps N with N > {state['step']} to train on, or leave it out"
            )
    if cfg is None:
        raise ValueError("train() needs a config unless resuming")
    cfg.validate()
    label = label or f"{cfg.residual}-s{cfg.seed}"
    if data is None:
        data = prepare(cfg, progress)
    tokenizer = data.tokenizer
    vocab = len(tokenizer)
    for split in ("train", "val"):
        if len(getattr(data, split)) <= cfg.seq_len:
            raise ConfigError(
                f"the {split} split has {len(getattr(data, split))} tokens, fewer than one sequence "
                f"of seq_len={cfg.seq_len}; give more text or a smaller seq_len"
            )
    if state is None:
        fresh.append((out, not out.exists()))
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.device
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)

    # model, optimizers, schedules (seeded: the shared weights are identical across residual arms)
    seed_everything(cfg.seed)
    if state is not None:
        model = load_model(ckpt)  # CheckpointError naming the file if it is truncated/corrupt
        if model.config.vocab_size != vocab:
            raise CheckpointError(
                f"tokenizer/model vocab mismatch: the data's tokenizer has {vocab} tokens, the "
                f"checkpoint's model {model.config.vocab_size}"
            )
    else:
        model = AttnResForCausalLM(cfg.model_config(vocab_size=vocab))
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    opts = build_optimizers(model, cfg)
    scheds = build_schedulers(opts, cfg)
    step, tokens = 0, 0
    saved_step = state["step"] if state is not None else None  # the step of the latest checkpoint

    def kept() -> str:
        if saved_step is None:
            return "this run has no checkpoint yet, so there is nothing to resume"
        return f"the last good checkpoint (step {saved_step}) is kept"

    if state is not None:
        for o, s in zip(opts, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for sc, s in zip(scheds, state["schedulers"], strict=True):
            sc.load_state_dict(s)  # the schedule function itself is this cfg's (a new max_steps stretches it)
        step, tokens = state["step"], state["tokens"]
        set_rng_state(state["rng"])
    metrics = _Metrics(out / "metrics.jsonl", state["metrics_pos"] if state is not None else None)

    # run.json: written fresh, or extended with this resume
    run_path = out / "run.json"
    run_info = (
        json.loads(run_path.read_text())
        if (state is not None and run_path.exists())
        else {
            "config": cfg.to_dict(),
            "model_config": model.config.to_dict(),
            "params": params,
            "seeds": {"seed": cfg.seed, "data_order_seed": cfg.seed, "split_seed": cfg.split_seed},
            "git": git_revision(),
            "versions": environment(),
            "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data": {
                "dir": str(data.dir),
                "train_tokens": len(data.train),
                "val_tokens": len(data.val),
                "train_bytes": data.train_bytes,
                "val_bytes": data.val_bytes,
                "vocab": vocab,
            },
        }
    )
    if state is not None:
        run_info.setdefault("resumes", []).append(
            {
                "step": step,
                "argv": sys.argv,
                "config": cfg.to_dict(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
    atomic_write_text(run_path, json.dumps(run_info, indent=2, default=str) + "\n")

    batches = Batches(data.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    probes_on = cfg.probes
    probe_batch = None
    bar = _Progress(progress, cfg.max_steps, step, label)

    def run_eval() -> None:
        nonlocal probes_on, probe_batch
        ev = evaluate(
            model,
            data.val,
            cfg.seq_len,
            cfg.batch_size,
            split_bytes=data.val_bytes,
            max_batches=cfg.eval_batches,
            bf16=cfg.bf16,
            device=device,
        )
        metrics.write(
            {
                "step": step,
                "val_loss": ev["loss"],
                "ppl": ev["ppl"],
                "bpb": ev["bpb"],
                "val_tokens": ev["tokens"],
            }
        )
        bar.log(
            f"step {step}/{cfg.max_steps} val_loss {ev['loss']:.4f} ppl {ev['ppl']:.2f} bpb {ev['bpb']:.4f}"
        )
        if probes_on:
            try:
                from ..analysis import collect_probes
            except ImportError as e:
                bar.log(f"probes off: attnres.analysis is not available ({e})")
                probes_on = False
                return
            if probe_batch is None:
                from ..data import eval_windows

                probe_batch = next(iter(eval_windows(data.val, cfg.seq_len, cfg.probe_batch_size, 1))).to(
                    device
                )
            model.zero_grad(set_to_none=True)
            probes = collect_probes(model, probe_batch)
            model.zero_grad(set_to_none=True)
            model.train()
            metrics.write({"step": step, "probes": probes})

    def checkpoint() -> Path:
        for p in model.parameters():
            if not torch.isfinite(p).all():
                raise NonFiniteLoss(
                    f"parameters became non-finite after step {step}; no checkpoint written, {kept()}. "
                    f"Lower lr or enable grad_clip."
                )
        st = {
            "step": step,
            "tokens": tokens,
            "optimizers": [o.state_dict() for o in opts],
            "schedulers": [s.state_dict() for s in scheds],
            "rng": rng_state(),
            "metrics_pos": metrics.position(),
            "train_config": cfg.to_dict(),
            "params": params,
        }
        nonlocal saved_step
        path = save_checkpoint(out, model, tokenizer, st, cfg.to_dict())
        saved_step = step
        return path

    try:
        with _SignalGuard() as guard:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for micro in range(cfg.grad_accum):
                    ids = batches.get(step * cfg.grad_accum + micro).to(device)
                    with autocast(device, cfg.bf16):
                        loss = model(ids, labels=ids, use_cache=False).loss
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.item() / cfg.grad_accum
                if not math.isfinite(loss_sum):
                    raise NonFiniteLoss(
                        f"non-finite training loss ({loss_sum}) at step {step + 1}; stopped without "
                        f"a checkpoint for it, {kept()}. Lower lr or enable grad_clip."
                    )
                if cfg.grad_clip > 0:
                    gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip).item()
                else:
                    gnorm = torch.nn.utils.get_total_norm(
                        [p.grad for p in trainable if p.grad is not None]
                    ).item()
                if not math.isfinite(gnorm):
                    raise NonFiniteLoss(
                        f"non-finite gradient norm ({gnorm}) at step {step + 1}; stopped without a "
                        f"checkpoint for it, {kept()}. Lower lr or enable grad_clip."
                    )
                lr = opts[0].param_groups[0]["lr"]
                for o in opts:
                    o.step()
                for s in scheds:
                    s.step()
                step += 1
                tokens += cfg.tokens_per_step
                dt = time.perf_counter() - t0
                metrics.write(
                    {
                        "step": step,
                        "train_loss": loss_sum,
                        "lr": lr,
                        "tokens": tokens,
                        "step_time": dt,
                        "grad_norm": gnorm,
                    }
                )
                bar.step(step, loss_sum, cfg.tokens_per_step / dt)
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    run_eval()
                saved_now = False
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    checkpoint()
                    saved_now = True
                if guard.signum is not None:
                    path = out / "checkpoint" if saved_now else checkpoint()
                    raise TrainingInterrupted(guard.signum, step, path)
    finally:
        bar.close()
        metrics.close()

    summary = summarize(cfg, read_metrics(out / "metrics.jsonl"), params, out)
    atomic_write_text(out / "result.json", json.dumps(summary, indent=2) + "\n")
    return summary
