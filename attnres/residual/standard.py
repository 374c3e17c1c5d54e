"""The PreNorm residual sum: h_{l+1} = h_l + f_l(norm(h_l)). The state is ``(h,)`` (schemes that change
only the write or the token attention, e.g. LayerScale and RealFormer, subclass it)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import DepthQuery, Pass, ResidualScheme, State


class StandardResidual(ResidualScheme):
    name = "standard"

    def start(self, embedding: Tensor, ctx: Pass) -> State:
        return (embedding,)

    def read(self, state: State, j: int, query: DepthQuery | None, norm: nn.Module, ctx: Pass,
             plan=None) -> Tensor:
        self._check_read(j)
        self._record(ctx, j, state[0])
        return norm(state[0])

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params=None, scores=None) -> State:
        return (state[0] + out,)

    def finish(self, state: State, query: DepthQuery | None, norm: nn.Module, ctx: Pass) -> Tensor:
        self._record(ctx, self.num_sublayers, state[0])
        return norm(state[0])
