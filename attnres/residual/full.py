"""Full AttnRes (PAPER Eq. 1-4): sublayer l reads a softmax over [h_1, f_1, ..., f_{l-1}]."""

from __future__ import annotations

from torch import Tensor

from .bank import BankStream, use_bank
from .base import AttnResScheme, Norm, ResidualStream


class FullStream(ResidualStream):
    def __init__(self, scheme: FullAttnRes, embedding: Tensor):
        self.scheme = scheme
        self.sources = [embedding]

    def read(self, norm: Norm) -> Tensor:
        return self.scheme.mix(len(self.sources) - 1, self.sources, norm)

    def write(self, out: Tensor) -> None:
        self.sources.append(out)

    def finish(self, norm: Norm) -> Tensor:
        return self.scheme.final(self.sources, norm)


class FullAttnRes(AttnResScheme):
    name = "full"

    def start(self, embedding: Tensor) -> ResidualStream:
        if use_bank(self, embedding):
            return BankStream(self, embedding, block_size=1)
        return FullStream(self, embedding)
