"""The functional residual-state interface every scheme implements (DESIGN.md).

A forward pass threads a *state*, a tuple of tensors, through the decoder layers::

    state = scheme.start(embedding, ctx)
    for each sublayer j:  x = scheme.read(state, j, query_j, norm_j, ctx)
                          state = scheme.write(state, j, f_j(x), ctx)
    hidden = scheme.finish(state, query_final, norm_final, ctx)

A scheme holds configuration only (no parameters, no per-forward state). ``read`` returns sublayer
j's *normalised* input. Read point j's parameters (:class:`DepthQuery`) live in the layer that reads;
``query`` is None for schemes without them. ``ctx`` (:class:`Pass`) says how the state is kept
(:class:`Mode`), chosen once per forward by the model, and whether reads are recorded.
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


@dataclass(frozen=True)
class Pass:
    """One forward pass's choices: the state's :class:`Mode` and where reads are recorded (or None)."""

    mode: Mode = Mode.STREAM
    records: list[DepthRead] | None = field(default=None, compare=False)


def rms(x: Tensor) -> float:
    return x.detach().float().pow(2).mean().sqrt().item()


class DepthQuery(nn.Module):
    """One read point's parameters: the pseudo-query w_l (zero-init, PAPER §5) and the key RMSNorm gain
    (one-init), both ``[D]`` and kept in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.pseudo_query = nn.Parameter(torch.zeros(hidden_size, dtype=torch.float32))
        self.key_norm_weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.pseudo_query.zero_()
            self.key_norm_weight.fill_(1.0)

    def forward(self, dtype: torch.dtype) -> Tensor:
        """q' = q * g in ``dtype`` (the key-norm gain folded into the query, as attn_res does). Reads call
        the module, so module hooks (FSDP2's all-gather, a per-module mixed-precision policy) run."""
        return self.pseudo_query.to(dtype) * self.key_norm_weight.to(dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.pseudo_query.shape[0]}"


class ResidualScheme:
    """A residual scheme: configuration and the functions of the state (see the module docstring)."""

    name: str = ""
    has_queries: bool = False  # whether its reads own a DepthQuery
    final_aggregation: bool = False  # whether the final output is a read with its own DepthQuery

    def __init__(self, num_sublayers: int, eps: float = 1e-6):
        self.num_sublayers = num_sublayers
        self.eps = eps  # epsilon of the key RMSNorm

    def start(self, embedding: Tensor, ctx: Pass) -> State:
        raise NotImplementedError

    def plan(self, state: State, j: int, queries: Sequence[DepthQuery | None], ctx: Pass):
        """Work shared by reads j, j+1, ... of one layer, computed once when the layer starts (or None)."""
        return None

    def read(self, state: State, j: int, query: DepthQuery | None, norm: nn.Module, ctx: Pass,
             plan=None) -> Tensor:
        raise NotImplementedError

    def write(self, state: State, j: int, out: Tensor, ctx: Pass) -> State:
        raise NotImplementedError

    def finish(self, state: State, query: DepthQuery | None, norm: nn.Module, ctx: Pass) -> Tensor:
        raise NotImplementedError

    def _check_read(self, j: int) -> None:
        if not 0 <= j < self.num_sublayers:
            raise RuntimeError(f"read point {j} does not exist: the scheme has {self.num_sublayers} sublayers")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_sublayers={self.num_sublayers})"

