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

The run's parts live beside this file: :mod:`.trainer` (build or restore, step, evaluate,
checkpoint, log), :mod:`.rundir` (``OUT``'s files) and :mod:`.console` (progress, signals).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, atomic_write_text, find_checkpoint, load_trainer_state
from .config import ConfigError, TrainConfig, config_diff, config_from_dict
from .console import Progress
from .rundir import (
    RUN_FILES,
    MetricsLog,
    NoMetrics,
    RunExistsError,
    check_out_dir,
    discard_partial_run,
    environment,
    git_revision,
    last_probes,
    read_metrics,
    summarize,
    write_run_info,
)
from .trainer import NonFiniteLoss, Trainer, TrainingInterrupted, build_or_restore, run_dir_saver

__all__ = [
    "RESUMABLE_KEYS",
    "RUN_FILES",
    "NonFiniteLoss",
    "RunExistsError",
    "TrainingInterrupted",
    "check_resumable",
    "environment",
    "git_revision",
    "last_probes",
    "prepare",
    "read_metrics",
    "saved_config",
    "summarize",
    "train",
]

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
    "activation_checkpointing",
    "init",  # where a fresh run's weights came from: the checkpoint holds them now
    "parallel",  # DDP or FSDP2: the same math; a sharded checkpoint loads into either
}


def check_resumable(saved: TrainConfig, cfg: TrainConfig) -> None:
    """Raise ConfigError if ``cfg`` changes a key of a saved run that may not change on resume."""
    diff = {k: v for k, v in config_diff(saved, cfg).items() if k not in RESUMABLE_KEYS}
    if diff:
        raise ConfigError(
            "cannot resume with a different config: "
            + "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        )


def saved_config(out_dir: str | Path) -> TrainConfig:
    """The config of the run whose checkpoint is in ``out_dir``."""
    ckpt = find_checkpoint(out_dir) if Path(out_dir).exists() else None
    if ckpt is None:
        raise CheckpointError(f"--resume: no checkpoint to resume in {out_dir}")
    return config_from_dict(load_trainer_state(ckpt)["train_config"])


def prepare(cfg: TrainConfig, progress: bool = True):
    """The run's data; ``tokenizer=init`` tokenizes it with the tokenizer saved in the init model's directory."""
    from ..data import prepare_data
    from .config import init_dir

    own = cfg.tokenizer == "init"
    return prepare_data(
        cfg.data_dir,
        sources=tuple(cfg.sources),
        tokenizer="pretrained" if own else cfg.tokenizer,
        vocab_size=cfg.vocab_size,
        val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed,
        progress=progress,
        tokenizer_path=init_dir(cfg.init) if own else None,
    )


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
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train one model into ``out_dir``; returns (and writes to ``OUT/result.json``) the summary.

    ``cfg=None`` with ``resume=True`` continues with the checkpoint's own config. ``data``: an
    already prepared :class:`attnres.data.TokenData` (``compare`` prepares once for all arms).
    ``cfg.num_threads`` applies for the run only; the caller's torch thread count is restored.
    A fresh run that fails before its first checkpoint leaves no partial run files behind.
    ``wrap(model)``, if given, returns what the steps run the model through (a parallel wrapper);
    it is called after the model is built or loaded and before the optimizers are built.
    ``stop_at``: stop after that step (< ``max_steps``) with a checkpoint there, as if interrupted, and
    return the summary so far without writing ``result.json``; the schedule is ``max_steps``' (a WSD
    cooldown branch resumes a copy of the run with a smaller ``max_steps``: :mod:`.scaling`).

    Several processes (torchrun sets ``WORLD_SIZE`` > 1): every process calls this with the same
    arguments. The plan (``parallel``, ``pipeline_*``) is checked against the job's size before any
    process group starts, then each process joins the job, the model is wrapped with
    :func:`attnres.distributed.parallelize` (DDP or FSDP2) unless ``wrap`` is given, each rank trains
    on its rows of every global batch, checkpoints are sharded (:mod:`attnres.distributed.checkpoint`),
    and rank 0 alone writes the run's files and shows progress; every rank returns the summary. With
    ``pipeline_stages`` = the job's size, each rank keeps its pipeline stages instead and the loop is
    :class:`attnres.distributed.pipeline.trainer.PipelineTrainer`'s (whole batches, one pipeline).
    """
    from ..distributed.world import env_world, init_distributed

    out = Path(out_dir)
    if cfg is None:
        cfg = saved_config(out) if resume else None
    if cfg is None:
        raise ValueError("train() needs a config unless resuming")
    if stop_at is not None and not 0 < stop_at <= cfg.max_steps:
        raise ValueError(f"stop_at must be in 1..max_steps={cfg.max_steps}, got {stop_at}")
    _check_plan(cfg.validate(), env_world().size)  # before any process group: a bad plan never hangs a job
    world = init_distributed(cfg.device)
    with world.failures():
        return _train(world, cfg, out, resume, progress, overwrite, data, label, wrap, stop_at)


def _train(world, cfg, out: Path, resume: bool, progress: bool, overwrite: bool, data, label, wrap,
           stop_at: int | None = None) -> dict[str, Any]:
    ckpt = world.on_main(check_out_dir, out, resume, overwrite)
    saved = load_trainer_state(ckpt) if ckpt is not None else None
    cfg = _resolve_config(cfg, saved, out)
    plan = _check_plan(cfg, world.size)
    if data is None:
        data = _prepare(cfg, progress, world)
    _check_splits(cfg, data)
    created = world.on_main(_make_dir, out)
    trainer = Trainer
    if wrap is None and world.distributed:
        wrap, trainer = _parallel(cfg, plan, world)
    try:
        return _run(cfg, out, data, ckpt, saved, progress, label or f"{cfg.residual}-s{cfg.seed}", wrap, world,
                    trainer, stop_at)
    except BaseException as e:
        if world.is_main and saved is None and not isinstance(e, TrainingInterrupted):
            discard_partial_run(out, created)
        raise


def _check_plan(cfg: TrainConfig, world_size: int):
    """The run's :class:`~attnres.distributed.ParallelPlan` for a job of ``world_size`` processes, checked."""
    from ..distributed.plan import ParallelPlan

    plan = ParallelPlan.from_config(cfg, world_size).check(cfg)
    if plan.pipeline_stages > 1:
        from ..distributed.pipeline.trainer import check_trainable

        check_trainable(plan, cfg)
    return plan


def _parallel(cfg: TrainConfig, plan, world):
    """``(wrap, trainer class)`` of a job of several processes: pipeline stages, or data parallel (DDP or
    FSDP2) with the plain :class:`Trainer`."""
    if plan.pipeline_stages > 1:
        from ..distributed.pipeline.trainer import PipelineTrainer, wrap_pipeline

        return functools.partial(wrap_pipeline, plan=plan, cfg=cfg), PipelineTrainer
    from ..distributed.data_parallel import parallelize

    return functools.partial(parallelize, plan=plan, world=world, device=cfg.device, bf16=cfg.bf16), Trainer


def _make_dir(out: Path) -> bool:
    """Create ``out`` (and its parents); whether it did not exist before."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created


def _prepare(cfg: TrainConfig, progress: bool, world):
    """The data, prepared by rank 0 first (fetched and encoded once, with its progress shown); the
    other ranks then read what it cached."""
    if not world.distributed:
        return prepare(cfg, progress)
    first = []
    world.on_main(lambda: first.append(prepare(cfg, progress)))
    return first[0] if first else prepare(cfg, False)


def _resolve_config(cfg: TrainConfig | None, saved: dict[str, Any] | None, out: Path) -> TrainConfig:
    """The run's config, validated: ``cfg``, else the checkpoint's; on resume it may differ from the
    checkpoint's only in :data:`RESUMABLE_KEYS` and may not end before the checkpoint's step."""
    if saved is not None:
        saved_cfg = config_from_dict(saved["train_config"])
        if cfg is None:
            cfg = saved_cfg
        check_resumable(saved_cfg, cfg)
        if saved["step"] > cfg.max_steps:
            raise ConfigError(
                f"--resume: the run in {out} is already at step {saved['step']}, past max_steps="
                f"{cfg.max_steps}; give --max-steps N with N > {saved['step']} to train on, or leave it out"
            )
    if cfg is None:
        raise ValueError("train() needs a config unless resuming")
    cfg.validate()
    return cfg


def _check_splits(cfg: TrainConfig, data) -> None:
    for split in ("train", "val"):
        if len(getattr(data, split)) <= cfg.seq_len:
            raise ConfigError(
                f"the {split} split has {len(getattr(data, split))} tokens, fewer than one sequence "
                f"of seq_len={cfg.seq_len}; give more text or a smaller seq_len"
            )


def _run(cfg, out: Path, data, ckpt, saved, progress: bool, label: str, wrap, world,
         trainer=Trainer, stop_at: int | None = None) -> dict[str, Any]:
    """Build or restore, record the run, train to ``max_steps`` (or ``stop_at``), summarize (files: rank 0's)."""
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    if saved is None and cfg.init is not None:
        _check_init_tokenizer(cfg, data.tokenizer)
    state = build_or_restore(cfg, len(data.tokenizer), ckpt, saved, wrap)
    params = state.num_params()
    resumed_at = state.step if saved is not None else None
    pos = saved["metrics_pos"] if saved is not None else None
    with MetricsLog(out / "metrics.jsonl", pos) if world.is_main else NoMetrics() as metrics:
        model_config = state.model.config.to_dict()
        world.on_main(write_run_info, out / "run.json", cfg, resumed_at, model_config=model_config, params=params,
                      data=data)
        with Progress(progress and world.is_main, cfg.max_steps, state.step, label) as bar:
            saver = _saver(out, data.tokenizer, cfg, world)
            trainer(cfg, state, data, metrics=metrics, progress=bar, saver=saver, saved_step=resumed_at,
                    world=world, stop_at=stop_at).run()
    return world.on_main(_summarize, cfg, out, params, state.step == cfg.max_steps)


def _check_init_tokenizer(cfg: TrainConfig, tokenizer) -> None:
    """A fresh run from ``cfg.init``: the tokenizer saved there (if any) must be the data's. With
    ``tokenizer=init`` the data was tokenized with it (:func:`prepare`); with byte / BPE the init model must
    use that one. The model's vocabulary must be the tokenizer's length (checked when it is loaded)."""
    from ..data.tokenizer import load_tokenizer
    from .config import init_dir

    d = init_dir(cfg.init)
    if not (d / "tokenizer.json").is_file():
        return
    try:
        theirs = load_tokenizer(d)
    except Exception as e:  # noqa: BLE001 - a corrupt tokenizer file surfaces as many exception types
        raise CheckpointError(f"init: cannot load the tokenizer in {d}: {str(e).splitlines()[0]}") from None
    if theirs.get_vocab() != tokenizer.get_vocab():
        if cfg.tokenizer == "init":  # the cached copy of the tokenizer differs from the file: a bug or a race
            raise CheckpointError(f"init: the tokenizer in {d} changed while its data was prepared; run again")
        raise CheckpointError(
            f"init: the tokenizer in {d} ({len(theirs)} tokens) is not the data's (tokenizer={cfg.tokenizer!r}, "
            f"{len(tokenizer)} tokens); the corpus is tokenized with the data's tokenizer, so the init model "
            f"must use that one (or tokenize with the model's own: tokenizer=init)"
        )
    if cfg.tokenizer == "init":
        from .config import init_model_config

        vocab = init_model_config(d).vocab_size
        if vocab != len(tokenizer):
            raise CheckpointError(
                f"init: the tokenizer in {d} has {len(tokenizer)} tokens but the model's vocab_size is {vocab}; "
                "tokenizer=init needs the two equal (a model whose embedding is padded past its tokenizer is not "
                "supported)"
            )


def _saver(out: Path, tokenizer, cfg: TrainConfig, world):
    """One process: ``OUT/checkpoint`` with ``model.safetensors``; several: a sharded (DCP) checkpoint."""
    if not world.distributed:
        return run_dir_saver(out, tokenizer, cfg)
    from ..distributed.checkpoint import sharded_saver

    return sharded_saver(out, tokenizer, cfg, world)


def _summarize(cfg: TrainConfig, out: Path, params: int, finished: bool = True) -> dict[str, Any]:
    summary = summarize(cfg, read_metrics(out / "metrics.jsonl"), params, out)
    if finished:
        atomic_write_text(out / "result.json", json.dumps(summary, indent=2) + "\n")
    return summary
