"""The PreNorm residual sum: h_{l+1} = h_l + f_l(norm(h_l))."""

from __future__ import annotations

from torch import Tensor

from .base import DepthRead, Norm, ResidualScheme, ResidualStream, rms


class StandardStream(ResidualStream):
    def __init__(self, scheme: StandardResidual, embedding: Tensor):
        self.scheme = scheme
        self.h = embedding
        self.count = 0

    def read(self, norm: Norm) -> Tensor:
        if self.scheme._records is not None:
            self.scheme._records.append(DepthRead(self.count, rms(self.h)))
        return norm(self.h)

    def write(self, out: Tensor) -> None:
        self.h = self.h + out
        self.count += 1

    def finish(self, norm: Norm) -> Tensor:
        return self.read(norm)


class StandardResidual(ResidualScheme):
    name = "standard"

    def start(self, embedding: Tensor) -> StandardStream:
        return StandardStream(self, embedding)
