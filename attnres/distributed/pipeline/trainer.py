"""``attnres train`` through pipeline stages: the trainer's one loop (:class:`~attnres.train.trainer.Trainer`)
with a pipeline's step, evaluation and gradient norm.

One pipeline over the whole job (world size == ``pipeline_stages``; no data parallelism yet). Every rank
builds the whole model, then :func:`wrap_pipeline` keeps its stages (:func:`~.runtime.build_pipeline`):
``state.wrapped`` is the :class:`~.runtime.Pipeline`, which ``runs_part``, so the optimizers hold only
this rank's parameters (no optimizer state, and no weight decay, for parameters another rank owns) and a
checkpoint has each rank write only its parameters (:func:`attnres.distributed.checkpoint.state_dicts`).
Parameters of other ranks' stages stay as built on this rank and are never read.

:class:`PipelineTrainer` changes four things of the loop:

- the step: each of the ``grad_accum`` micro-batches (the whole global micro-batch on every rank) is one
  :meth:`Pipeline.step`, split into ``pipeline_microbatches``; the gradients of the micro-batches are
  kept and summed, each scaled by ``1 / grad_accum``; the losses (returned on every rank, as 0-d device
  tensors) are stacked without a host read;
- the gradient norm: each rank's squared norm, summed over the ranks (one all-reduce), then clipped
  with that global norm;
- evaluation: the validation windows of :func:`attnres.train.evaluate.evaluate`, each batch through
  :meth:`Pipeline.eval_loss` (:func:`window_loss`), ppl and bpb from the same code;
- probes (they need the whole model in one process) are off, said once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...train.config import ConfigError
from ...train.evaluate import evaluate_loss
from ...train.trainer import StepOutput, Trainer
from ..plan import ParallelPlan
from .runtime import Pipeline, build_pipeline


def check_trainable(plan: ParallelPlan, cfg) -> None:
    """What ``attnres train`` does not run under pipeline stages yet: one-line :class:`ConfigError`s, before
    any process group."""
    if plan.pipeline_stages == 1:
        return
    if plan.data_parallel > 1:
        raise ConfigError(
            f"pipeline_stages={plan.pipeline_stages} on {plan.world_size} processes would be {plan.data_parallel} "
            f"data-parallel pipelines, which `attnres train` does not support yet; launch exactly "
            f"{plan.pipeline_stages} processes"
        )
    if cfg.bf16:
        raise ConfigError("bf16=true with pipeline_stages > 1: bf16 autocast across pipeline stages is not "
                          "supported; set bf16=false")


def wrap_pipeline(model: nn.Module, plan: ParallelPlan, cfg) -> Pipeline:
    """The trainer's ``wrap`` under a pipeline: this rank's stages of ``model``, for steps of
    ``batch_size x seq_len`` tokens."""
    return build_pipeline(model, plan, batch_size=cfg.batch_size, seq_len=cfg.seq_len)


class PipelineTrainer(Trainer):
    """:class:`~attnres.train.trainer.Trainer` with a :class:`Pipeline` as ``state.wrapped`` (module
    docstring). Rank 0 logs, as in data parallel runs; every rank holds the step's loss."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.probes_on:
            self.progress.log("probes off: a pipeline rank holds only its stages' part of the model")
            self.probes_on = False

    @property
    def pipe(self) -> Pipeline:
        return self.state.wrapped

    def micro_batches(self):
        """The next step's micro-batches, whole: one pipeline takes the global micro-batch."""
        first = self.state.step * self.cfg.grad_accum
        for i in range(first, first + self.cfg.grad_accum):
            yield self.batches.get(i).to(self.cfg.device)

    def forward_backward(self) -> StepOutput:
        for o in self.state.optimizers:
            o.zero_grad(set_to_none=True)
        params, n = self.pipe.parameters(), self.cfg.grad_accum
        losses = [accumulate(params, lambda ids=ids: self.pipe.step(ids, ids), n) for ids in self.micro_batches()]
        if len(losses) != n:
            raise ValueError(f"a step takes grad_accum={n} micro-batches; got {len(losses)}")
        return StepOutput(torch.stack(losses), global_grad_norm_(params, self.cfg.grad_clip, self.pipe.group))

    def validation(self) -> dict[str, float]:
        cfg, model = self.cfg, self.state.model
        was_training = model.training
        model.eval()
        try:
            return evaluate_loss(lambda w: window_loss(self.pipe, w), self.data.val, cfg.seq_len, cfg.batch_size,
                                 split_bytes=self.data.val_bytes, max_batches=cfg.eval_batches, device=cfg.device)
        finally:
            model.train(was_training)


def accumulate(params: list[nn.Parameter], step, n: int) -> Tensor:
    """Run ``step()`` (a :meth:`Pipeline.step`, which sets the gradients anew) and add its gradients,
    scaled by ``1 / n``, to those the parameters held before; returns its loss."""
    kept = [p.grad for p in params]
    loss = step()
    for p, g in zip(params, kept, strict=True):
        if p.grad is not None and n > 1:
            p.grad.div_(n)
        if g is not None:
            p.grad = g if p.grad is None else g.add_(p.grad)
    return loss


def global_grad_norm_(params: list[nn.Parameter], clip: float, group=None) -> Tensor:
    """The gradient norm over every rank's ``params`` (one all-reduce of the squared norm), clipping
    each rank's gradients with it to ``clip`` when that is > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=params[0].device)
    squared = local.square()
    dist.all_reduce(squared, group=group)
    norm = squared.sqrt()
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def window_loss(pipe: Pipeline, window: Tensor) -> Tensor:
    """The mean next-token loss of a batch of windows through the pipeline. Its rows in whole
    microbatches go in one :meth:`Pipeline.eval_loss`; a rest of fewer rows (the split's last batch) is
    repeated once per microbatch, so each microbatch is that rest and their mean is its loss."""
    m = pipe.microbatches
    whole, rows = len(window) // m * m, len(window)
    total = pipe.eval_loss(window[:whole], window[:whole]) * whole if whole else 0.0
    if whole < rows:
        rest = window[whole:].repeat(m, 1)
        total = total + pipe.eval_loss(rest, rest) * (rows - whole)
    return total / rows
