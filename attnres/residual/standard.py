"""The PreNorm residual sum: h_{l+1} = h_l + f_l(norm(h_l)). The state is ``(h,)``."""

from __future__ import annotations

from torch import Tensor, nn

from .base import DepthQuery, DepthRead, Pass, ResidualScheme, State, rms


class StandardResidual(ResidualScheme):
    name = "standard"

    def start(self, embedding: Tensor, ctx: Pass) -> State:
        return (embedding,)

    def read(self, state: State, j: int, query: DepthQuery | None, norm: nn.Module, ctx: Pass,
             plan=None) -> Tensor:
        self._check_read(j)
        return self._normed(state, j, norm, ctx)

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params=None, scores=None) -> State:
        return (state[0] + out,)

    def finish(self, state: State, query: DepthQuery | None, norm: nn.Module, ctx: Pass) -> Tensor:
        return self._normed(state, self.num_sublayers, norm, ctx)

    def _normed(self, state: State, j: int, norm: nn.Module, ctx: Pass) -> Tensor:
        if ctx.records is not None:
            ctx.records.append(DepthRead(j, rms(state[0])))
        return norm(state[0])
