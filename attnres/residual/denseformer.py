"""DenseFormer: Depth-Weighted Averages (DWA) of earlier hidden states (ZOO.md §1; arXiv 2402.02622).

Units are decoder layers (``granularity="block"``, the original: a DWA after each whole PreNorm block) or
sublayers (``"sublayer"``, the AttnRes paper's Table 5 rendering). X_0 is the embedding; unit i runs the
standard residual from Y_{i-1} and ends with X_i, its output hidden state. After unit i, if it has a DWA
(period p: i % p == 0), Y_i = sum_m a_{i,m} X_m over m <= i with m = i (mod k) (dilation k), and the stream
continues from Y_i; without one, Y_i = X_i. The weights are unnormalised and unconstrained, one
``[floor(i/k) + 1]`` vector per DWA, initialised to the identity (a_{i,i} = 1, others 0), so a fresh
DenseFormer *is* the standard PreNorm transformer. They live in the module of the sublayer that ends the
unit (``layers.{i}.mlp_res`` for blocks) and are 1-D (no weight decay in attnres's optimizer grouping).

State: ``(h, X_0, X_1, ..., X_m)``, the running hidden state and every unit output so far. One layout in
every mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops._checks import compute_dtype
from .base import Pass, ResidualParams, ResidualScheme, State, init_copy_
from .keys import Key, ModelDims


class DepthWeights(ResidualParams):
    """One DWA's weights ``[sources]`` (oldest first), fp32; init: the identity, all weight on the newest."""

    def __init__(self, num_sources: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_sources, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        identity = torch.zeros_like(self.weight)
        identity[-1] = 1.0
        init_copy_(self.weight, identity)


class DenseFormer(ResidualScheme):
    name = "denseformer"
    keys = (
        Key("denseformer_dilation", 1, "k: a DWA averages only the unit outputs X_m with m = i (mod k) "
            "(k x p DenseFormer; 1 x 1 is the reference)", unit="units", minimum=1),
        Key("denseformer_period", 1, "p: a DWA follows only units i with i % p == 0 (1-based)", unit="units",
            minimum=1),
        Key("denseformer_granularity", "block", "a unit is a decoder layer ('block', the original) or one "
            "sublayer ('sublayer')", kind="choice", choices=("block", "sublayer")),
    )

    def __init__(self, num_sublayers: int, eps: float = 1e-6, denseformer_dilation: int = 1,
                 denseformer_period: int = 1, denseformer_granularity: str = "block"):
        super().__init__(num_sublayers, eps)
        for key, value in zip(self.keys, (denseformer_dilation, denseformer_period, denseformer_granularity),
                              strict=True):
            key.validate(value)
        self.dilation, self.period = denseformer_dilation, denseformer_period
        self.unit = 2 if denseformer_granularity == "block" else 1
        if num_sublayers % self.unit:
            raise ValueError(f"denseformer_granularity='block' needs an even number of sublayers, got {num_sublayers}")

    @classmethod
    def build(cls, dims: ModelDims, options: dict) -> DenseFormer:
        return cls(dims.num_sublayers, dims.eps, **options)

    def dwa(self, j: int) -> int | None:
        """The unit i (1-based) whose DWA follows sublayer j's write, or None."""
        if (j + 1) % self.unit:
            return None
        i = (j + 1) // self.unit
        return None if i % self.period else i

    def sources(self, i: int) -> list[int]:
        """The unit outputs X_m the DWA after unit i averages (oldest first)."""
        return [m for m in range(i + 1) if m % self.dilation == i % self.dilation]

    def read_params(self, j: int, hidden_size: int) -> nn.Module | None:
        i = self.dwa(j) if j < self.num_sublayers else None
        return None if i is None else DepthWeights(len(self.sources(i)))

    def start(self, embedding: Tensor, ctx: Pass) -> State:
        return (embedding, embedding)

    def read(self, state: State, j: int, query, norm: nn.Module, ctx: Pass, plan=None) -> Tensor:
        self._check_read(j)
        self._record(ctx, j, state[0])
        return norm(state[0])

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params=None, scores=None) -> State:
        h = state[0] + out
        if (j + 1) % self.unit:
            return (h, *state[1:])
        xs = (*state[1:], h)  # X_0 .. X_i
        i = self.dwa(j)
        if i is not None:
            ct = compute_dtype(h.dtype)
            a = params.weight.to(ct)
            h = sum(a[n] * xs[m].to(ct) for n, m in enumerate(self.sources(i))).to(h.dtype)
        return (h, *xs)

    def finish(self, state: State, query, norm: nn.Module, ctx: Pass) -> Tensor:
        self._record(ctx, self.num_sublayers, state[0])
        return norm(state[0])

    def __repr__(self) -> str:
        return (f"DenseFormer(num_sublayers={self.num_sublayers}, dilation={self.dilation}, period={self.period}, "
                f"granularity={'block' if self.unit == 2 else 'sublayer'})")
