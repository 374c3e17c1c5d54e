"""Block AttnRes (PAPER Eq. 5-6).

Sublayers are grouped into blocks of ``block_size`` (the paper's S, counted in sublayers).
b_0 is the embedding, kept as its own source; b_n sums the outputs of block n's sublayers.
The i-th sublayer of block n reads a softmax over [b_0, ..., b_{n-1}] (i = 1) or
[b_0, ..., b_{n-1}, b_n^{i-1}] (i >= 2), where b_n^{i-1} is the partial sum so far. When the
sublayer count is not a multiple of S, the last block is shorter and its partial sum is its
representation.

Reads use the two-phase schedule (PAPER Alg. 1, ``attnres.ops.two_phase``): when a block opens,
phase 1 computes the inter-block terms of all its reads at once, against the completed blocks
whose key statistics are computed once each; every read then merges its partial sum. Small
inputs use the single joint read, which is the same function, and without autograd (decode steps)
the bank stream of ``bank.py``; recording uses the joint read.
"""

from __future__ import annotations

from torch import Tensor

from ..ops import key_rstd, merged_read, phase1
from ..ops._checks import compute_dtype, source_dtype
from .bank import BankStream, use_bank
from .base import AttnResScheme, Norm, ResidualStream

# below this many tokens per forward a read is too small for phase 1 to pay for its extra ops
TWO_PHASE_MIN_TOKENS = 64


class BlockStream(ResidualStream):
    def __init__(self, scheme: BlockAttnRes, embedding: Tensor):
        self.scheme = scheme
        self.blocks = [embedding]  # b_0, then every completed block
        self.partial: Tensor | None = None  # b_n^i; None while i = 0
        self.count = 0  # sublayers written so far
        tokens = embedding.numel() // embedding.shape[-1]
        self.two_phase = scheme.two_phase and tokens >= TWO_PHASE_MIN_TOKENS and scheme._records is None
        self.rstd: list[Tensor] = []  # key rstd of each completed block, filled by phase 1
        self.queries: Tensor | None = None  # folded queries of the open block's reads
        self.inter = None  # their phase-1 terms

    def _sources(self) -> list[Tensor]:
        return self.blocks if self.partial is None else [*self.blocks, self.partial]

    def read(self, norm: Norm) -> Tensor:
        j = self.count
        if not self.two_phase or j >= self.scheme.num_sublayers:
            return self.scheme.mix(j, self._sources(), norm)
        i = j % self.scheme.block_size
        if i == 0:  # the block opens: phase 1 for all of its reads
            end = min(j + self.scheme.block_size, self.scheme.num_sublayers)
            self.queries = self.scheme.folded_queries(j, end, compute_dtype(source_dtype(self.blocks)))
            self.rstd += [key_rstd(b, norm.eps) for b in self.blocks[len(self.rstd):]]
            self.inter = phase1(self.queries, self.blocks, self.rstd)
        out, _ = merged_read(self.queries[i], self.inter[i], self.blocks, self.partial, norm.weight, norm.eps)
        return out

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

    def __init__(self, hidden_size: int, num_sublayers: int, block_size: int, final_aggregation: bool = True,
                 two_phase: bool = True):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int (sublayers per block), got {block_size!r}")
        super().__init__(hidden_size, num_sublayers, final_aggregation)
        self.block_size = block_size
        self.two_phase = two_phase

    @property
    def num_blocks(self) -> int:
        """Blocks after the embedding (the paper's N), counting a shorter tail block."""
        return -(-self.num_sublayers // self.block_size)

    def start(self, embedding: Tensor) -> ResidualStream:
        if use_bank(self, embedding):
            return BankStream(self, embedding, self.block_size)
        return BlockStream(self, embedding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, two_phase={self.two_phase}"
