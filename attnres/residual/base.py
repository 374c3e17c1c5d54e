"""The functional residual-state interface every scheme implements (DESIGN.md).

A forward pass threads a *state*, a tuple of tensors, through the decoder layers::

    state = scheme.start(embedding, ctx)
    for each sublayer j:  x = scheme.read(state, j, params_j, norm_j, ctx)
                          bias = scheme.score_bias(state, j, ctx)          # attention sublayers only
                          state = scheme.write(state, j, f_j(x), ctx, params_j[, scores])
    hidden = scheme.finish(state, params_final, norm_final, ctx)

A scheme holds configuration only (no parameters, no per-forward state). ``read`` returns sublayer
j's *normalised* input. Read point j's parameters are the module ``scheme.read_params(j, hidden_size)``
(or None), created once by the model and living in the layer that reads: ``layers.{i}.attn_res``
(j = 2i), ``layers.{i}.mlp_res`` (j = 2i + 1), ``output_res`` (j = num_sublayers). The same module is
handed to ``write`` for sublayer j (a scheme's per-sublayer write parameters, e.g. LayerScale gains,
live there too). ``ctx`` (:class:`Pass`) says how the state is kept (:class:`Mode`), chosen once per
forward by the model, and whether reads are recorded; schemes other than Full/Block keep one layout
and run it for every mode.

The one hook beyond read/write is :meth:`ResidualScheme.score_bias`: a scheme may add a bias to an
attention sublayer's token-attention scores and receives the biased scores back in ``write`` (RealFormer's
residual attention). All schemes but ``realformer`` return None and attention runs unchanged (SDPA).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

State = tuple[Tensor, ...]


class Mode(enum.Enum):
    """How a forward pass keeps its residual state."""

    STREAM = "stream"  # a tuple of source tensors, one joint read per sublayer (training; any input)
    TWO_PHASE = "two_phase"  # the same state; Block batches phase 1 over each layer's reads (training, prefill)
    BANK = "bank"  # no autograd: every source in one preallocated [slots, ..., D] tensor (cached decode)


@dataclass(frozen=True)
class DepthRead:
    """What one read saw, recorded for analysis (detached).

    ``read`` is the read point: ``2*i`` before decoder layer i's attention, ``2*i + 1`` before its
    MLP, ``num_sublayers`` for the final output. ``hidden_rms`` is the RMS over all tokens of the
    hidden state h_l *before* the PreNorm (PAPER Fig. 5b). For AttnRes reads ``weights`` is
    ``[num_sources, ...]``, row i for source i (Full: 0 = embedding, j = output of sublayer j;
    Block: 0 = embedding, n = block n, completed or partial); None for standard reads and for an
    AttnRes final output without aggregation.
    """

    read: int
    hidden_rms: float
    weights: Tensor | None = None


class Chain:
    """The carriers (``attnres.ops.grads``) of the last carried read's completed sources, which the next read,
    whose sources begin with the same tensors, takes as its ``carry``: each source's gradient then builds up in
    one buffer. One per forward pass, set by its reads."""

    def __init__(self):
        self.carriers: tuple[Tensor, ...] = ()


@dataclass(frozen=True)
class Pass:
    """One forward pass's choices: the state's :class:`Mode`, where reads are recorded (or None) and whether
    Full/Block reads carry their sources' gradients (a :class:`Chain`, or None)."""

    mode: Mode = Mode.STREAM
    records: list[DepthRead] | None = field(default=None, compare=False)
    chain: Chain | None = field(default=None, compare=False)


def rms(x: Tensor) -> float:
    return x.detach().float().pow(2).mean().sqrt().item()


@dataclass(frozen=True)
class ScoreBias:
    """What a scheme adds to attention sublayer j's token-attention scores (:meth:`ResidualScheme.score_bias`).

    The sublayer computes its scaled scores S = QK^T / sqrt(d_h), ``[B, heads, q, kv]``, forms
    T = S + ``bias`` (``bias`` None: T = S), masks ``scale * T`` and takes its softmax; it hands T
    (before the mask) to ``scheme.write(..., scores=T)``. Explicit scores cost B * heads * q * kv memory.
    """

    bias: Tensor | None = None
    scale: float = 1.0


class ResidualParams(nn.Module):
    """Base of every read point's parameter module. :meth:`reset_parameters` sets the scheme's init through
    ``torch.nn.init`` (or :func:`init_copy_`), so HF's loader, which guards those functions, never re-inits a
    loaded parameter; ``std`` is the model's linear init (``initializer_range``). Parameters are fp32."""

    def reset_parameters(self, std: float = 0.02) -> None:
        raise NotImplementedError


def init_copy_(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` unless HF marked ``param`` as loaded (as ``transformers.initialization.copy_``)."""
    if not getattr(param, "_is_hf_initialized", False):
        with torch.no_grad():
            param.copy_(value)


class DepthQuery(ResidualParams):
    """One read point's parameters: the pseudo-query w_l (zero-init, PAPER §5) and the key RMSNorm gain
    (one-init), both ``[D]`` and kept in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.pseudo_query = nn.Parameter(torch.zeros(hidden_size, dtype=torch.float32))
        self.key_norm_weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.zeros_(self.pseudo_query)
        nn.init.ones_(self.key_norm_weight)

    def forward(self, dtype: torch.dtype) -> Tensor:
        """q' = q * g in ``dtype`` (the key-norm gain folded into the query, as attn_res does). Reads call
        the module, so module hooks (FSDP2's all-gather, a per-module mixed-precision policy) run."""
        return self.pseudo_query.to(dtype) * self.key_norm_weight.to(dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.pseudo_query.shape[0]}"


class ResidualScheme:
    """A residual scheme: configuration and the functions of the state (see the module docstring)."""

    name: str = ""
    has_queries: bool = False  # Full/Block's fast path: every read point owns a DepthQuery (the CPU kernel is built)
    final_aggregation: bool = False  # whether the final output is a read with its own parameters
    uses_read_kernel: bool = False  # whether reads go through ops.attn_res.read (the model builds the CPU kernel)
    keys: tuple = ()  # its config keys (keys.Key), validated by AttnResConfig through the registry

    def __init__(self, num_sublayers: int, eps: float = 1e-6):
        self.num_sublayers = num_sublayers
        self.eps = eps  # epsilon of the key RMSNorm

    def read_params(self, j: int, hidden_size: int) -> nn.Module | None:
        """A fresh parameter module for read point j (0..num_sublayers; the last is the final output), or
        None. It is used by ``read`` j and ``write`` j (and ``finish`` for j = num_sublayers)."""
        return DepthQuery(hidden_size) if self.has_queries and (j < self.num_sublayers or self.final_aggregation) \
            else None

    def start(self, embedding: Tensor, ctx: Pass) -> State:
        raise NotImplementedError

    def plan(self, state: State, j: int, queries: Sequence[nn.Module | None], ctx: Pass):
        """Work shared by reads j, j+1, ... of one layer, computed once when the layer starts (or None)."""
        return None

    def read(self, state: State, j: int, query: nn.Module | None, norm: nn.Module, ctx: Pass,
             plan=None) -> Tensor:
        raise NotImplementedError

    def score_bias(self, state: State, j: int, ctx: Pass) -> ScoreBias | None:
        """The general attention hook: asked before attention sublayer j (j even) runs. None (every scheme
        but RealFormer): attention is untouched and ``write`` gets no scores. A :class:`ScoreBias`: the
        sublayer adds it to its scores and ``write`` receives the biased, unmasked scores as ``scores``."""
        return None

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params: nn.Module | None = None,
              scores: Tensor | None = None) -> State:
        """The state after sublayer j wrote ``out``; ``params`` is read point j's module, ``scores`` the
        attention scores when :meth:`score_bias` asked for them."""
        raise NotImplementedError

    def finish(self, state: State, query: nn.Module | None, norm: nn.Module, ctx: Pass) -> Tensor:
        raise NotImplementedError

    def _record(self, ctx: Pass, j: int, h: Tensor, weights: Tensor | None = None) -> None:
        if ctx.records is not None:
            ctx.records.append(DepthRead(j, rms(h), None if weights is None else weights.detach()))

    def _check_read(self, j: int) -> None:
        if not 0 <= j < self.num_sublayers:
            raise RuntimeError(f"read point {j} does not exist: the scheme has {self.num_sublayers} sublayers")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_sublayers={self.num_sublayers})"

