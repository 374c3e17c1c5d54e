"""Block AttnRes (PAPER Eq. 5-6).

Sublayers are grouped into blocks of ``block_size`` (the paper's S, counted in sublayers).
b_0 is the embedding, kept as its own source; b_n sums the outputs of block n's sublayers.
The i-th sublayer of block n reads a softmax over [b_0, ..., b_{n-1}] (i = 1) or
[b_0, ..., b_{n-1}, b_n^{i-1}] (i >= 2), where b_n^{i-1} is the partial sum so far. When the
sublayer count is not a multiple of S, the last block is shorter and its partial sum is its
representation.
"""

from __future__ import annotations

from torch import Tensor

from .base import AttnResScheme, Norm, ResidualStream


class BlockStream(ResidualStream):
    def __init__(self, scheme: BlockAttnRes, embedding: Tensor):
        self.scheme = scheme
        self.blocks = [embedding]  # b_0, then every completed block
        self.partial: Tensor | None = None  # b_n^i; None while i = 0
        self.count = 0  # sublayers written so far

    def _sources(self) -> list[Tensor]:
        return self.blocks if self.partial is None else [*self.blocks, self.partial]

    def read(self, norm: Norm) -> Tensor:
        return self.scheme.mix(self.count, self._sources(), norm)

    def write(self, out: Tensor) -> None:
        self.partial = out if self.partial is None else self.partial + out
        self.count += 1
        if self.count % self.scheme.block_size == 0:
            self.blocks.append(self.partial)
            self.partial = None

    def finish(self, norm: Norm) -> Tensor:
        return self.scheme.final(self._sources(), norm)


class BlockAttnRes(AttnResScheme):
    name = "block"

    def __init__(self, hidden_size: int, num_sublayers: int, block_size: int, final_aggregation: bool = True):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int (sublayers per block), got {block_size!r}")
        super().__init__(hidden_size, num_sublayers, final_aggregation)
        self.block_size = block_size

    @property
    def num_blocks(self) -> int:
        """Blocks after the embedding (the paper's N), counting a shorter tail block."""
        return -(-self.num_sublayers // self.block_size)

    def start(self, embedding: Tensor) -> BlockStream:
        return BlockStream(self, embedding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"
