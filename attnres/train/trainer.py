"""The parts of a training run: build or restore, step, evaluate, checkpoint, log.

:func:`attnres.train.loop.train` drives them for one process. They are cut so that a distributed
driver can reuse them around a wrapped model (the model code does not change):

- :func:`build_or_restore` seeds, builds the model (or loads a checkpoint's), hands it to ``wrap``
  (DDP, ``fully_shard``, ...; none by default) and only then builds the optimizers and schedules,
  restoring their states, the step, the token count and the RNG states when resuming.
- :func:`forward_backward` runs one step's micro-batches through ``state.wrapped`` and returns the
  losses and the gradient norm as device tensors, reading nothing back to the host;
  :func:`optimizer_step` applies the update.
- :class:`Trainer` runs a :class:`TrainState` to ``max_steps``: it reads each step's scalars
  once, writes rows to ``metrics`` (the run's :class:`~.rundir.MetricsLog`; a driver gives the
  ranks that do not log a sink that drops rows), evaluates, and checkpoints through ``saver``.

Host syncs: one per training step. After the backward and the gradient norm,
:meth:`StepOutput.read` copies the micro-batch losses and the gradient norm to the host in one
transfer. That one read serves both the non-finite check, which must come before the optimizer
applies the update (a non-finite step is never applied), and the step's metrics row, which is
written every step, so a second, deferred read would buy nothing. Nothing is read per
micro-batch. Outside the steps: evaluation reads one loss per window, and a checkpoint one
finiteness flag for all parameters together.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError, is_sharded, load_model, rng_state, save_checkpoint
from .config import TrainConfig
from .console import Progress, SignalGuard
from .evaluate import autocast, evaluate
from .optim import build_optimizers, build_schedulers

if TYPE_CHECKING:  # attnres.distributed imports attnres.train: imported where used
    from ..distributed.world import World


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- build or restore


@dataclass
class TrainState:
    """What a step changes and a checkpoint restores."""

    model: nn.Module  # the HF model: saved, evaluated and probed; the optimizers hold its parameters
    # what the step runs: wrap(model), or model itself when nothing wraps it. A wrapper that runs only this
    # process's part of the model (a pipeline's stages) says so with ``runs_part = True``; its
    # ``named_parameters()`` (the model's names) are then what the optimizers hold and this rank saves
    wrapped: nn.Module
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # training tokens seen

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """The schedules, step and token count of ``saved`` (the optimizer states are restored by
        :func:`attnres.distributed.checkpoint.restore`, which knows every checkpoint's form)."""
        for sc, s in zip(self.schedulers, saved["schedulers"], strict=True):
            sc.load_state_dict(s)  # the schedule function itself is this cfg's (a new max_steps stretches it)
            # the next step's lr from this cfg's schedule, not the one the saved run's schedule left
            for group, base, factor in zip(sc.optimizer.param_groups, sc.base_lrs, sc.lr_lambdas, strict=True):
                group["lr"] = base * factor(sc.last_epoch)
        self.step, self.tokens = saved["step"], saved["tokens"]


def build_model(cfg: TrainConfig, vocab: int, ckpt: Path | None = None) -> nn.Module:
    """A fresh model for ``cfg`` (seed first), ``cfg.init``'s saved model (a fresh run that starts from one), or
    ``ckpt``'s; a loaded model's vocabulary must be ``vocab`` (the data's tokenizer's)."""
    from ..models import AttnResForCausalLM, enable_activation_checkpointing

    if ckpt is None and cfg.init is None:
        model = AttnResForCausalLM(cfg.model_config(vocab_size=vocab))
    else:
        what = "checkpoint's" if ckpt is not None else f"init model's ({cfg.init})"
        # CheckpointError naming the file if it is missing, truncated or corrupt
        model = load_model(ckpt if ckpt is not None else _init_dir(cfg.init))
        if model.config.vocab_size != vocab:
            raise CheckpointError(
                f"tokenizer/model vocab mismatch: the data's tokenizer has {vocab} tokens, the "
                f"{what} model {model.config.vocab_size}"
                + ("" if ckpt is not None else f"; prepare the data with a tokenizer of {model.config.vocab_size}")
            )
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def _init_dir(path: str) -> Path:
    from .config import init_dir

    d = init_dir(path)
    if not d.is_dir():
        raise CheckpointError(f"init: {path} does not exist")
    return d


def build_or_restore(
    cfg: TrainConfig,
    vocab: int,
    ckpt: Path | None = None,
    saved: dict[str, Any] | None = None,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainState:
    """The model, optimizers and schedules of a run: fresh, or as checkpoint ``ckpt`` left them.

    Seeds everything with ``cfg.seed`` (so the shared weights are identical across residual arms),
    builds the model or loads ``ckpt``'s onto ``cfg.device`` in train mode, passes it to ``wrap``
    and only then builds the optimizers and schedules on its parameters. With ``saved`` (``ckpt``'s
    trainer state) their states, the step, the token count and the RNG states are restored, so
    the next step is the one the saved run would have taken next. A sharded checkpoint's weights
    (several processes wrote it) load after wrapping, into whatever the model became.
    """
    from ..distributed.checkpoint import restore

    seed_everything(cfg.seed)
    model = build_model(cfg, vocab, None if ckpt is None or is_sharded(ckpt) else ckpt)
    model.to(cfg.device).train()
    wrapped = model if wrap is None else wrap(model)
    opts = build_optimizers(wrapped if runs_part(wrapped) else model, cfg)
    state = TrainState(model, wrapped, opts, build_schedulers(opts, cfg))
    if saved is not None:
        restore(state, ckpt, saved)
    return state


def runs_part(wrapped) -> bool:
    """Whether ``wrapped`` runs only this process's part of the model (:class:`TrainState`)."""
    return getattr(wrapped, "runs_part", False)


# ----------------------------------------------------------------------------- one step


@dataclass
class StepOutput:
    """A step's scalars, still on the device."""

    micro_losses: torch.Tensor  # (grad_accum,): each micro-batch's mean loss, detached
    grad_norm: torch.Tensor  # (): the total gradient norm, before clipping

    def read(self) -> tuple[float, float]:
        """``(train_loss, grad_norm)`` as Python floats, in one device-to-host copy.

        ``train_loss`` is the mean of the micro-batch losses, summed as ``loss_i / n`` in float64
        on the host (so it needs no float64 on the device).
        """
        dtype = torch.promote_types(self.micro_losses.dtype, self.grad_norm.dtype)
        both = torch.cat([self.micro_losses.to(dtype), self.grad_norm.reshape(1).to(dtype)])
        *losses, grad_norm = both.tolist()
        loss = 0.0
        for x in losses:
            loss += x / len(losses)
        return loss, grad_norm


def grad_norm_(model: nn.Module, clip: float) -> torch.Tensor:
    """The total gradient norm of ``model``'s trainable parameters; clips to ``clip`` if it is > 0.
    With FSDP2 shards the norm is the whole model's (a collective), as ``clip_grad_norm_`` would be."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # a DTensor: the local shards' norms, not yet combined
        norm = norm.full_tensor()
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def forward_backward(state: TrainState, micro_batches: Iterable[torch.Tensor], cfg: TrainConfig) -> StepOutput:
    """The gradients of one step, without applying them and without reading anything to the host.

    Zeroes the gradients, runs each of the ``cfg.grad_accum`` micro-batches (token ids on the
    device) forward and backward through ``state.wrapped`` with its loss scaled by
    ``1 / grad_accum`` (so the gradients are those of the mean loss), then takes the gradient norm,
    clipping to ``cfg.grad_clip`` when that is > 0. A wrapper with ``no_sync`` (DDP) reduces the
    gradients once, in the last micro-batch's backward.
    """
    for o in state.optimizers:
        o.zero_grad(set_to_none=True)
    losses = []
    for i, ids in enumerate(micro_batches):
        with _sync_unless(state.wrapped, i < cfg.grad_accum - 1):
            with autocast(cfg.device, cfg.bf16):
                loss = state.wrapped(ids, labels=ids, use_cache=False).loss
            (loss / cfg.grad_accum).backward()
        losses.append(loss.detach())
    if len(losses) != cfg.grad_accum:
        raise ValueError(f"a step takes grad_accum={cfg.grad_accum} micro-batches; got {len(losses)}")
    return StepOutput(torch.stack(losses), grad_norm_(state.model, cfg.grad_clip))


def _sync_unless(wrapped: nn.Module, local: bool):
    """``wrapped.no_sync()`` when ``local`` (a micro-batch before the last) and it has one (DDP)."""
    no_sync = getattr(wrapped, "no_sync", None)
    return no_sync() if local and no_sync is not None else contextlib.nullcontext()


def optimizer_step(state: TrainState, cfg: TrainConfig) -> float:
    """Apply the gradients, advance the schedules, the step and the token count; returns the
    learning rate the update used (the first optimizer's first group's)."""
    lr = state.optimizers[0].param_groups[0]["lr"]
    for o in state.optimizers:
        o.step()
    for s in state.schedulers:
        s.step()
    state.step += 1
    state.tokens += cfg.tokens_per_step
    return lr


# ----------------------------------------------------------------------------- the run

Saver = Callable[[TrainState, dict[str, Any]], Path]


def run_dir_saver(out: Path, tokenizer, cfg: TrainConfig) -> Saver:
    """Save to ``out/checkpoint`` (:func:`~.checkpoint.save_checkpoint`): model, tokenizer, config and
    the trainer state."""

    def save(state: TrainState, trainer_state: dict[str, Any]) -> Path:
        return save_checkpoint(out, state.model, tokenizer, trainer_state, cfg.to_dict())

    return save


class Trainer:
    """Runs ``state`` to ``cfg.max_steps`` on ``data`` (:class:`attnres.data.TokenData`).

    ``metrics`` takes the rows (``write(row)``) and says how long its file is (``position()``,
    recorded in each checkpoint); ``saver`` writes a checkpoint and returns its path;
    ``saved_step`` is the step of the latest checkpoint already on disk, if any.

    ``world`` (:class:`attnres.distributed.World`; one process by default): in a job of several
    processes every rank runs this same loop on its contiguous rows of each global micro-batch; the
    step's loss is the mean over ranks (the global batch's), and the finiteness checks and a stop
    on SIGINT/SIGTERM are agreed by all ranks, so they all stop at the same step. Which rank logs is
    the driver's choice (``metrics`` and ``progress``). A driver with another schedule (pipeline
    stages: :class:`attnres.distributed.pipeline.trainer.PipelineTrainer`) overrides
    :meth:`micro_batches`, :meth:`forward_backward` and :meth:`validation`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        state: TrainState,
        data,
        *,
        metrics,
        progress: Progress,
        saver: Saver,
        saved_step: int | None = None,
        world: World | None = None,
        stop_at: int | None = None,
    ):
        from ..data import Batches
        from ..distributed.world import World

        self.world = world or World()
        self.cfg, self.state, self.data = cfg, state, data
        self.metrics, self.progress, self.saver = metrics, progress, saver
        self.saved_step, self.last_checkpoint = saved_step, None
        self.batches = Batches(data.train, cfg.batch_size, cfg.seq_len, cfg.seed)
        self.params = state.num_params()
        self.probes_on, self.probe_batch = cfg.probes, None
        self.stop_at = cfg.max_steps if stop_at is None else stop_at

    def run(self) -> None:
        """Train to ``max_steps`` (or to ``stop_at``, with a checkpoint there), evaluating every
        ``eval_every`` and checkpointing every ``checkpoint_every`` steps (and both at the last).
        SIGINT/SIGTERM finish the step, save a checkpoint and raise :class:`TrainingInterrupted`."""
        cfg = self.cfg
        with SignalGuard() as guard:
            while self.state.step < self.stop_at:
                self.train_step()
                step, last = self.state.step, self.state.step == cfg.max_steps
                if step % cfg.eval_every == 0 or last:
                    self.evaluate()
                saved_now = step % cfg.checkpoint_every == 0 or last or step == self.stop_at
                if saved_now:
                    self.save_checkpoint()
                signum = self.world.max(guard.signum or 0)  # every rank stops after the same step
                if signum:
                    path = self.last_checkpoint if saved_now else self.save_checkpoint()
                    raise TrainingInterrupted(signum, step, path)

    def micro_batches(self) -> Iterator[torch.Tensor]:
        """The micro-batches of the next step: batch ``step * grad_accum + i`` of the training split
        (this rank's rows of it)."""
        first = self.state.step * self.cfg.grad_accum
        for i in range(first, first + self.cfg.grad_accum):
            yield self.world.shard(self.batches.get(i)).to(self.cfg.device)

    def forward_backward(self) -> StepOutput:
        """The next step's gradients (:func:`forward_backward` on :meth:`micro_batches`), its losses
        averaged over the ranks; a driver with another schedule (pipeline stages) overrides this."""
        out = forward_backward(self.state, self.micro_batches(), self.cfg)
        return StepOutput(self.world.mean(out.micro_losses), out.grad_norm)

    def train_step(self) -> dict[str, Any]:
        """One step and its row: the gradients, the step's one host read (checked finite before the
        update is applied), the update."""
        t0 = time.perf_counter()
        loss, grad_norm = self.forward_backward().read()
        self.check_finite(loss, grad_norm)
        lr = optimizer_step(self.state, self.cfg)
        dt = time.perf_counter() - t0
        row = {
            "step": self.state.step,
            "train_loss": loss,
            "lr": lr,
            "tokens": self.state.tokens,
            "step_time": dt,
            "grad_norm": grad_norm,
        }
        self.log(row)
        self.progress.step(self.state.step, loss, self.cfg.tokens_per_step / dt)
        return row

    def check_finite(self, loss: float, grad_norm: float) -> None:
        for what, x in (("training loss", loss), ("gradient norm", grad_norm)):
            if not math.isfinite(x):
                raise NonFiniteLoss(
                    f"non-finite {what} ({x}) at step {self.state.step + 1}; stopped without a "
                    f"checkpoint for it, {self.kept()}. Lower lr or enable grad_clip."
                )

    def kept(self) -> str:
        if self.saved_step is None:
            return "this run has no checkpoint yet, so there is nothing to resume"
        return f"the last good checkpoint (step {self.saved_step}) is kept"

    def log(self, row: dict[str, Any]) -> None:
        self.metrics.write(row)

    def evaluate(self) -> dict[str, Any]:
        """Validation loss, perplexity and bits per byte (and the probes, when on) at this step."""
        cfg, step = self.cfg, self.state.step
        ev = self.validation()
        row = {"step": step, "val_loss": ev["loss"], "ppl": ev["ppl"], "bpb": ev["bpb"], "val_tokens": ev["tokens"]}
        self.log(row)
        self.progress.log(
            f"step {step}/{cfg.max_steps} val_loss {ev['loss']:.4f} ppl {ev['ppl']:.2f} bpb {ev['bpb']:.4f}"
        )
        if self.probes_on:
            self.probe()
        return row

    def validation(self) -> dict[str, float]:
        """:func:`~.evaluate.evaluate` of the model on the validation split (``eval_batches`` windows);
        a driver with another forward (pipeline stages) overrides this."""
        cfg = self.cfg
        return evaluate(self.state.model, self.data.val, cfg.seq_len, cfg.batch_size, split_bytes=self.data.val_bytes,
                        max_batches=cfg.eval_batches, bf16=cfg.bf16, device=cfg.device)

    def probe(self) -> None:
        """A probes row (:func:`attnres.analysis.collect_probes` on one validation batch)."""
        try:
            from ..analysis import collect_probes
        except ImportError as e:
            self.progress.log(f"probes off: attnres.analysis is not available ({e})")
            self.probes_on = False
            return
        if self.probe_batch is None:
            from ..data import eval_windows

            windows = eval_windows(self.data.val, self.cfg.seq_len, self.cfg.probe_batch_size, 1)
            self.probe_batch = next(iter(windows)).to(self.cfg.device)
        model = self.state.model
        model.zero_grad(set_to_none=True)
        probes = collect_probes(model, self.probe_batch)
        model.zero_grad(set_to_none=True)
        model.train()
        self.log({"step": self.state.step, "probes": probes})

    def save_checkpoint(self) -> Path:
        """Save through ``saver``, unless a parameter is non-finite (:class:`NonFiniteLoss`, nothing
        written)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.state.model.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in local]).all()
        if not self.world.all(bool(finite)):  # one host read for all parameters (this rank's shards)
            raise NonFiniteLoss(
                f"parameters became non-finite after step {self.state.step}; no checkpoint written, "
                f"{self.kept()}. Lower lr or enable grad_clip."
            )
        trainer_state = {
            **self.state.state_dict(),
            "rng": rng_state(),
            "metrics_pos": self.metrics.position(),
            "train_config": self.cfg.to_dict(),
            "params": self.params,
        }
        self.last_checkpoint = self.saver(self.state, trainer_state)
        self.saved_step = self.state.step
        return self.last_checkpoint
