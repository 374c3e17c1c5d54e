"""One pipeline stage of an unchanged :class:`~attnres.models.AttnResForCausalLM`, and its torch stage.

:class:`StageModule` runs stage k: the first embeds the tokens, every stage runs its decoder layers on the
residual state (DESIGN.md, "The seam"), the last finishes (final read, norm) and applies the LM head.
Its wire is ``(hidden, *delta)`` (``layout.py``); the sources it lacks come from the rank's store. The
cache logic sits around the layers, so a layer's activation checkpointing (``layer.gradient_checkpointing``)
recomputes the layer alone. Parameter names are the full model's (``model.layers.3.mlp.up_proj.weight``).

:class:`CachedStage` is torch's ``PipelineStage`` with static metadata and three overrides: the forward
hands the stage its store leaves as keyword inputs, and after a backward the deposits on them are counted
and restored (the full backward clears them) and the deposits on received sources join the wire gradient.
These depend on torch 2.13's stage internals (kwargs tensors among ``input_values``; ``stage_backward``
clearing their ``.grad``); the multi-process tests pin that behaviour.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage

from ...models.modeling import TWO_PHASE_MIN_TOKENS
from ...residual import Mode, Pass
from .layout import Layout
from .store import RankStore


class StageModule(nn.Module):
    def __init__(self, lm: nn.Module, layout: Layout, k: int, store: RankStore):
        super().__init__()
        base = lm.model
        self.k, self.layout, self.store = k, layout, store
        self.first, self.last = k == 0, k == layout.num_stages - 1
        lo = sum(layout.layers[:k])
        self.model = nn.Module()
        if self.first:
            self.model.embed_tokens = base.embed_tokens
        self.model.layers = nn.ModuleDict({str(i): base.layers[i] for i in range(lo, lo + layout.layers[k])})
        if self.last:
            self.model.norm = base.norm
            self.model.output_res = base.output_res
            self.lm_head = lm.lm_head
        self.scheme = base.residual
        self.two_phase = lm.config.attn_res_two_phase
        self.dtype = base.embed_tokens.weight.dtype  # the wire's (static metadata)
        self._rope = base._rope  # a function of the config and positions

    def forward(self, *wire: Tensor, cached: tuple[Tensor, ...] = ()) -> Tensor | tuple[Tensor, ...]:
        mb = self.store.current.get(self.k)
        x = self.model.embed_tokens(wire[0]) if self.first else wire[0]
        rows, t = x.shape[:2]
        ctx = Pass(Mode.TWO_PHASE if self.two_phase and rows * t >= TWO_PHASE_MIN_TOKENS else Mode.STREAM)
        rope = self._rope(torch.arange(t, device=x.device)[None], x.dtype)
        state = self.scheme.start(x, ctx) if self.first else self._enter(wire, cached, mb)
        for layer in self.model.layers.values():
            state = layer(*state, ctx=ctx, rope=rope, mask=None, causal=t > 1, cache=None)
        if self.last:
            self.store.release(self.k, mb)
            return self.lm_head(self.scheme.finish(state, self.model.output_res, self.model.norm, ctx))
        return self._leave(state, mb)

    def _enter(self, wire: tuple[Tensor, ...], cached: tuple[Tensor, ...], mb: int) -> tuple[Tensor, ...]:
        """The state at the stage's entry, from the wire and the store; keeps the received sources the rank
        will read again."""
        lay, k = self.layout, self.k
        for j, pos in lay.received_held(k):
            self.store.put(k, mb, j, wire[pos], pos)
        sources = dict(zip(lay.wire_in(k), wire, strict=True)) | dict(zip(lay.cached_in(k), cached, strict=True))
        return tuple(sources[j] for j in range(len(sources)))

    def _leave(self, state: tuple[Tensor, ...], mb: int) -> tuple[Tensor, ...]:
        """Keeps the sources this stage completed that its rank reads again; returns the hop's wire."""
        lay, k = self.layout, self.k
        n = lay.n_sources(lay.bounds(k)[1])
        if len(state) != n:
            raise RuntimeError(f"stage {k} ends with {len(state)} residual sources, the layout expects {n}")
        wire = tuple(state[j] for j in lay.wire_out(k))
        if any(t.dtype != self.dtype for t in wire):
            raise RuntimeError(f"stage {k} sends {sorted({str(t.dtype) for t in wire})}, the pipeline's wire is "
                               f"{self.dtype} (the parameters' dtype); autocast across stages is not supported")
        for j in lay.computed_held(k):
            self.store.put(k, mb, j, state[j])
        self.store.release(k, mb)
        return wire


class CachedStage(PipelineStage):
    """A :class:`StageModule` as a torch pipeline stage (static metadata: no inference forward)."""

    def __init__(self, module: StageModule, input_args: tuple[Tensor, ...], output_args: tuple[Tensor, ...],
                 device: torch.device, group=None):
        super().__init__(module, module.k, module.layout.num_stages, device, input_args=input_args,
                         output_args=output_args, group=group)
        self.store = module.store
        self.n_wire = len(input_args)
        self._bwd_mb: int | None = None

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
        k = self.stage_index
        kwargs = {**(kwargs or {}), "cached": self.store.take(k, fwd_chunk_id)}
        self.store.current[k] = fwd_chunk_id
        try:
            return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        finally:
            del self.store.current[k]

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        self._bwd_mb = bwd_chunk_id
        return super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                          last_backward=last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        self._bwd_mb = bwd_chunk_id  # the first stage's split backward runs in full here
        return super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)

    # torch 2.13's V-shape schedules hand gradients between a rank's two stages even in eval(), where
    # there are none (AssertionError "can't steal_bwd_input ..."): without a backward there is nothing to hand.
    def get_local_bwd_output(self, mb_index):
        return super().get_local_bwd_output(mb_index) if self.has_backward else ()

    def set_local_bwd_input(self, next_stage_bwd_outputs, mb_index):
        if self.has_backward:
            super().set_local_bwd_input(next_stage_bwd_outputs, mb_index)

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs, last_backward=False):
        grads, groups = super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward=last_backward)
        if backward_type in ("full", "input"):
            grads = self._settle(backward_type == "full", bwd_kwargs["input_values"], grads)
        return grads, groups

    def _settle(self, full: bool, inputs: list, grads: tuple) -> tuple:
        """Count the deposits on the store leaves (and put back those the full backward cleared); add
        the deposits on received sources to their wire gradients."""
        k, mb, n = self.stage_index, self._bwd_mb, self.n_wire
        if full:
            for leaf, g in zip(inputs[n:], grads[n:], strict=True):
                leaf.grad = g
        self.store.deposit(k, mb, grads[n:])
        return self.store.settle_wire(k, mb, grads)
