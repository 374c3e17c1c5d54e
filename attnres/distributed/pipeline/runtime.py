"""Build a pipeline for a :class:`~attnres.distributed.plan.ParallelPlan` and drive it: a step (loss and
gradients) and an evaluation loss, for a trainer.

Every rank builds the whole, unchanged model and keeps its stages (``StageModule`` shares the model's
parameters, so names and values are the model's). A step splits the batch into microbatches; the loss is the
mean of the microbatch next-token losses (with ignored labels, -100, that is the mean of per-microbatch
means, as gradient accumulation takes it), returned on every rank of the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import pipelining as pp

from ..plan import SCHEDULES, ParallelPlan
from .layout import V_SHAPE, Layout, style_of
from .stage import CachedStage, StageModule
from .store import RankStore

RESIDUALS = ("standard", "full", "block")  # state layouts the routing table knows: (h,) and Block's source list
SINGLE_STAGE = ("GPipe", "1F1B")  # one stage per rank
SPLIT_BACKWARD = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")  # input and weight gradients apart
SCHEDULE_CLASSES = {
    "GPipe": pp.ScheduleGPipe,
    "1F1B": pp.Schedule1F1B,
    "Interleaved1F1B": pp.ScheduleInterleaved1F1B,
    "LoopedBFS": pp.ScheduleLoopedBFS,
    "InterleavedZeroBubble": pp.ScheduleInterleavedZeroBubble,
    "ZBVZeroBubble": pp.ScheduleZBVZeroBubble,
    "DualPipeV": pp.ScheduleDualPipeV,
}


def microbatches(plan: ParallelPlan) -> int:
    return plan.pipeline_microbatches or plan.pipeline_stages * plan.pipeline_virtual


def check_plan(plan: ParallelPlan, model_config, batch_size: int, split: tuple[int, ...] | None = None) -> None:
    """Raise :class:`~attnres.train.config.ConfigError` (one line) if the pipeline of ``plan`` cannot run
    ``model_config`` on a step of ``batch_size`` rows: the global batch, which ``plan.data_parallel``
    pipelines share. ``split``: decoder layers per stage (default: equal)."""
    problem = _stage_problem(plan, model_config, split) or _batch_problem(plan, batch_size)
    if problem:
        from ...train.config import ConfigError

        raise ConfigError(problem)


def _stage_problem(plan: ParallelPlan, config, split) -> str | None:
    P, V, name = plan.pipeline_stages, plan.pipeline_virtual, plan.pipeline_schedule
    L, C = config.num_hidden_layers, plan.pipeline_stages * plan.pipeline_virtual
    if name not in SCHEDULES:
        return f"pipeline_schedule must be one of {', '.join(SCHEDULES)}; got {name!r}"
    if P < 1 or V < 1:
        return f"pipeline_stages and pipeline_virtual must be >= 1, got {P} and {V}"
    if plan.world_size % P:
        return f"world_size={plan.world_size} is not a multiple of pipeline_stages={P}"
    if name in SINGLE_STAGE and V != 1:
        return f"pipeline_schedule={name} runs one stage per rank: pipeline_virtual must be 1, got {V}"
    if name in V_SHAPE and V != 2:
        return f"pipeline_schedule={name} runs two stages per rank: pipeline_virtual must be 2, got {V}"
    if split is None and L % C:
        return (f"num_hidden_layers={L} does not split into pipeline_stages x pipeline_virtual = {C} equal "
                f"stages; change the counts or give a split (layers per stage)")
    if split is not None and (len(split) != C or sum(split) != L or min(split) < 1):
        return f"the split {tuple(split)} must give each of the {C} stages at least one of the {L} decoder layers"
    if config.residual not in RESIDUALS:
        return (f"pipeline parallelism runs residual {', '.join(RESIDUALS)} (the state layouts its routing table "
                f"knows); got residual={config.residual!r}")
    if config.tie_word_embeddings:
        return "tie_word_embeddings is not supported with pipeline parallelism: embedding and LM head are two stages"
    return None


def _batch_problem(plan: ParallelPlan, batch_size: int) -> str | None:
    P, name, M, dp = plan.pipeline_stages, plan.pipeline_schedule, microbatches(plan), plan.data_parallel
    C = P * plan.pipeline_virtual
    if M < 1:
        return f"pipeline_microbatches must be >= 0 (0: P x V), got {plan.pipeline_microbatches}"
    if batch_size % dp:
        return f"batch_size={batch_size} does not split over {dp} data-parallel pipelines"
    if (batch_size // dp) % M:
        share = f" ({batch_size // dp} rows for each of {dp} pipelines)" if dp > 1 else ""
        return f"batch_size={batch_size}{share} does not split into {M} microbatches (pipeline_microbatches)"
    rounds = max(1, M // P)
    if name == "1F1B" and M < P:
        return f"pipeline_schedule=1F1B needs at least pipeline_stages={P} microbatches, got {M}"
    if name == "DualPipeV" and M < C:
        return f"pipeline_schedule=DualPipeV needs at least {C} microbatches (one per stage), got {M}"
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and M % rounds:
        return (f"pipeline_schedule={name} needs the microbatches ({M}) to be a multiple of its rounds, "
                f"max(1, microbatches // pipeline_stages) = {rounds}")
    return None


def _checkpointing_problem(model: nn.Module, plan: ParallelPlan) -> str | None:
    """Reentrant checkpointing refuses ``autograd.grad(inputs=...)``, which split-backward schedules call."""
    name = plan.pipeline_schedule
    if name not in SPLIT_BACKWARD:
        return None
    for layer in model.model.layers:
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        if layer.gradient_checkpointing and getattr(fn, "keywords", {}).get("use_reentrant", False):
            return (f"reentrant activation checkpointing cannot run under pipeline_schedule={name} (its split "
                    f"backward calls autograd.grad); enable it with use_reentrant=False")
    return None


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of each position's next token over the labelled ones (-100: ignored); half
    precision logits are taken in fp32, others in their own dtype."""
    x = logits[:, :-1].flatten(0, 1)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return F.cross_entropy(x, labels[:, 1:].flatten().to(x.device), ignore_index=-100)


@dataclass
class _Runtime:
    stages: list[CachedStage]
    schedule: object


class Pipeline:
    """This rank's stages of a pipeline over ``model`` (see :func:`build_pipeline`)."""

    runs_part = True  # for the trainer: this rank runs, updates and saves only its stages' parameters

    def __init__(self, model: nn.Module, plan: ParallelPlan, layout: Layout, rank: int, group=None):
        self.plan, self.layout, self.rank, self.group = plan, layout, rank, group
        self.store = RankStore(layout, rank)
        self.modules = {k: StageModule(model, layout, k, self.store)
                        for k in range(layout.num_stages) if layout.ranks[k] == rank}
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.hidden_size, self.vocab_size = model.config.hidden_size, model.config.vocab_size
        self._runtimes: dict[tuple, _Runtime] = {}
        self._shape: tuple[int, int] | None = None

    @property
    def microbatches(self) -> int:
        return microbatches(self.plan)

    @property
    def stages(self) -> list[CachedStage]:
        """The training stages for the batch shape given to :func:`build_pipeline`."""
        return self._runtime(self._shape, True).stages

    @property
    def schedule(self):
        return self._runtime(self._shape, True).schedule

    def named_parameters(self):
        """This rank's parameters under the full model's names."""
        for module in self.modules.values():
            yield from module.named_parameters()

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def step(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Forward and backward of one batch: the gradients are left on this rank's parameters (zeroed
        first); returns the loss (0-d, float64), the same on every rank of the pipeline."""
        runtime = self._runtime(tuple(input_ids.shape), True)
        for p in self.parameters():
            p.grad = None
        return self._run(runtime.schedule.step, input_ids, labels)

    def eval_loss(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """The loss of one batch, forward only; gradients already on the parameters are left alone."""
        runtime = self._runtime(tuple(input_ids.shape), False)
        with torch.no_grad():
            return self._run(runtime.schedule.eval, input_ids, labels)

    def _run(self, run, input_ids: Tensor, labels: Tensor) -> Tensor:
        last = self.layout.num_stages - 1
        losses: list[Tensor] = []
        args = (input_ids.to(self.device),) if 0 in self.modules else ()
        target = labels.to(self.device) if last in self.modules else None
        try:
            run(*args, target=target, losses=losses, return_outputs=False)
        except BaseException:
            self.store.clear()
            raise
        self.store.check_empty()
        return self._share_loss(losses)

    def _share_loss(self, losses: list[Tensor]) -> Tensor:
        # on the stages' device on every rank: a CPU tensor would go over gloo where the last rank's goes over NCCL
        mean = torch.stack(losses).mean() if losses else torch.zeros((), device=self.device)
        loss = mean.detach().double()
        src = self.layout.ranks[-1]
        if self.group is not None:
            src = dist.get_global_rank(self.group, src)
        dist.broadcast(loss, src=src, group=self.group)
        return loss

    def _runtime(self, shape: tuple[int, int], train: bool) -> _Runtime:
        """Stages and schedule for batches of ``shape`` (static metadata is per shape); an evaluation
        schedule never rescales gradients (torch's runs its gradient scaling even in ``eval()``)."""
        key = (shape, train)
        if key not in self._runtimes:
            rows, t = shape
            if rows % self.microbatches:
                raise ValueError(f"a batch of {rows} rows does not split into {self.microbatches} microbatches")
            stages = [CachedStage(m, *self._examples(k, rows // self.microbatches, t), self.device, self.group)
                      for k, m in sorted(self.modules.items())]
            self._runtimes[key] = _Runtime(stages, self._make_schedule(stages, train))
        return self._runtimes[key]

    def _examples(self, k: int, rows: int, t: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Meta tensors with the shapes and dtypes of stage k's inputs and outputs."""
        lay = self.layout

        def acts(n: int, width: int = self.hidden_size) -> tuple[Tensor, ...]:
            return tuple(torch.empty(rows, t, width, dtype=self.dtype, device="meta", requires_grad=True)
                         for _ in range(n))

        inputs = (torch.empty(rows, t, dtype=torch.long, device="meta"),) if k == 0 else acts(len(lay.wire_in(k)))
        outputs = acts(1, self.vocab_size) if k == lay.num_stages - 1 else acts(len(lay.wire_out(k)))
        return inputs, outputs

    def _make_schedule(self, stages: list[CachedStage], train: bool):
        name = self.plan.pipeline_schedule
        cls = SCHEDULE_CLASSES[name]
        schedule = cls(stages[0] if name in SINGLE_STAGE else stages, n_microbatches=self.microbatches,
                       loss_fn=next_token_loss, scale_grads=train)
        placed = tuple(stages[0].stage_index_to_group_rank[k] for k in range(self.layout.num_stages))
        if placed != self.layout.ranks:
            raise RuntimeError(f"{name} places stages on ranks {placed}, the layout on {self.layout.ranks}")
        return schedule


def build_pipeline(model: nn.Module, plan: ParallelPlan, rank: int | None = None, *, batch_size: int,
                   seq_len: int, group=None, split: tuple[int, ...] | None = None,
                   keep_exit: bool = True) -> Pipeline:
    """This rank's part of the pipeline of ``plan`` over ``model`` (an :class:`AttnResForCausalLM`, whole
    and unchanged on every rank), ready for batches of ``batch_size`` x ``seq_len`` tokens: this pipeline's
    share of a step (other shapes get their own stages on first use).

    ``group``: the pipeline's process group (default: the world), with ``plan.pipeline_stages`` ranks;
    ``rank``: this process's rank in it (default: looked up). ``split``: decoder layers per stage (default:
    equal). ``keep_exit``: see :mod:`.layout`. The residual scheme decides what a hop carries;
    ``plan.pipeline_cache`` switches the cross-stage cache (Block/Full)."""
    config = model.config
    check_plan(plan, config, batch_size * plan.data_parallel, split)
    problem = _checkpointing_problem(model, plan)
    if problem:
        from ...train.config import ConfigError

        raise ConfigError(problem)
    size = dist.get_world_size(group)
    if size != plan.pipeline_stages:
        raise ValueError(f"the pipeline group has {size} ranks, the plan has pipeline_stages={plan.pipeline_stages}")
    rank = dist.get_rank(group) if rank is None else rank
    block = None if config.residual == "standard" else config.block_size
    layout = Layout.build(config.num_hidden_layers, plan.pipeline_stages, plan.pipeline_virtual, block,
                          style=style_of(plan.pipeline_schedule), split=split, cache=plan.pipeline_cache,
                          keep_exit=keep_exit)
    pipe = Pipeline(model, plan, layout, rank, group)
    pipe._shape = (batch_size, seq_len)
    pipe._runtime(pipe._shape, True)
    return pipe
