"""Block AttnRes (PAPER Eq. 5-6) and Full AttnRes (Eq. 1-4, Block with S = 1).

Sublayers are grouped into blocks of ``block_size`` (the paper's S, counted in sublayers).
b_0 is the embedding, kept as its own source; b_n sums the outputs of block n's sublayers.
The i-th sublayer of block n reads a softmax over [b_0, ..., b_{n-1}] (i = 1) or
[b_0, ..., b_{n-1}, b_n^{i-1}] (i >= 2), where b_n^{i-1} is the partial sum so far. When the
sublayer count is not a multiple of S, the last block is shorter and its partial sum is its
representation. With S = 1 every output is its own block: Full AttnRes.

The state *is* the source list: ``(b_0, ..., b_{n-1})`` or ``(b_0, ..., b_{n-1}, partial)``; whether
the last entry is a partial sum follows from the sublayer index (j % S != 0). In ``Mode.TWO_PHASE``
a layer's :meth:`plan` runs phase 1 (PAPER Alg. 1, ``attnres.ops.two_phase``) once for those of its
reads that see the same completed blocks, and each of them merges its partial sum. ``Mode.BANK``
keeps the sources in one preallocated tensor (``bank.py``).

A read that applies the sublayer's norm itself writes, under autocast, the sublayer's input in the autocast
dtype (``norm.sublayer_dtype``): the values the sublayer's matmuls would cast it to; the final read's output
(``last_hidden_state``) keeps the sources' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops import InterBlock, merged_read, phase1
from ..ops._checks import compute_dtype, source_dtype
from ..ops.attn_res import read as attn_read
from . import bank
from .base import DepthQuery, Mode, Pass, ResidualScheme, State
from .norm import fusable, sublayer_dtype


@dataclass(frozen=True)
class TwoPhasePlan:
    """Phase-1 terms of reads ``first .. first + len(inter) - 1`` against ``blocks``."""

    first: int
    blocks: State
    queries: Tensor  # folded, [k, D]
    inter: list[InterBlock]


class BlockAttnRes(ResidualScheme):
    name = "block"
    has_queries = True
    uses_read_kernel = True

    def __init__(self, num_sublayers: int, block_size: int, final_aggregation: bool = True, eps: float = 1e-6):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int (sublayers per block), got {block_size!r}")
        super().__init__(num_sublayers, eps)
        self.block_size = block_size
        self.final_aggregation = bool(final_aggregation)

    @property
    def num_blocks(self) -> int:
        """Blocks after the embedding (the paper's N), counting a shorter tail block."""
        return -(-self.num_sublayers // self.block_size)

    def start(self, embedding: Tensor, ctx: Pass) -> State:
        if ctx.mode is Mode.BANK:
            return bank.start(embedding, 1 + self.num_blocks)
        return (embedding,)

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params=None, scores=None) -> State:
        if ctx.mode is Mode.BANK:
            return bank.write(state, j, out, self.block_size)
        if j % self.block_size == 0:  # opens a block: the output is its partial sum
            return (*state, out)
        return (*state[:-1], state[-1] + out)

    def plan(self, state: State, j: int, queries: Sequence[DepthQuery | None], ctx: Pass) -> TwoPhasePlan | None:
        if ctx.mode is not Mode.TWO_PHASE:
            return None
        n = j // self.block_size
        k = sum(1 for i in range(len(queries)) if (j + i) // self.block_size == n and j + i < self.num_sublayers)
        if k < 2:  # one read: phase 1 would be the joint read taken apart
            return None
        blocks = state[: n + 1]
        ct = compute_dtype(source_dtype(blocks))
        qs = torch.stack([q(ct) for q in queries[:k]])
        return TwoPhasePlan(j, blocks, qs, phase1(qs, blocks, self.eps))

    def read(self, state: State, j: int, query: DepthQuery | None, norm: nn.Module, ctx: Pass,
             plan: TwoPhasePlan | None = None) -> Tensor:
        self._check_read(j)
        if ctx.mode is Mode.BANK:
            return bank.read(state, bank.sources(state, j, self.block_size), query(state[0].dtype),
                             norm, self.eps, self._fuse(norm, ctx))
        if plan is not None and j - plan.first < len(plan.inter):
            return self._merged(state, j, plan, norm, ctx)
        return self._joint(j, state, query, norm, ctx)

    def finish(self, state: State, query: DepthQuery | None, norm: nn.Module, ctx: Pass) -> Tensor:
        j = self.num_sublayers
        if ctx.mode is Mode.BANK:
            qp = query(state[0].dtype) if self.final_aggregation else None
            return bank.read(state, bank.sources(state, j, self.block_size), qp, norm, self.eps, self._fuse(norm, ctx))
        if self.final_aggregation:
            return self._joint(j, state, query, norm, ctx)
        h = sum(state[1:], state[0])
        self._record(ctx, j, h)
        return norm(h)

    def _fuse(self, norm: nn.Module, ctx: Pass) -> bool:
        return ctx.records is None and fusable(norm) and norm.eps == self.eps

    def _joint(self, j: int, sources: State, query: DepthQuery, norm: nn.Module, ctx: Pass) -> Tensor:
        ct = compute_dtype(source_dtype(sources))
        qp = query(ct)
        carry = None if ctx.chain is None else ctx.chain.carriers
        if self._fuse(norm, ctx):
            dtype = sublayer_dtype(sources[0], ct) if j < self.num_sublayers else None
            o, _p, *out = attn_read(qp, norm.weight.to(ct), self.eps, sources, dtype, carry)
            self._pass_on(ctx, j, out)
            return o
        h, p, *out = attn_read(qp, None, self.eps, sources, None, carry)
        self._pass_on(ctx, j, out)
        self._record(ctx, j, h, p)
        return norm(h)

    def _merged(self, state: State, j: int, plan: TwoPhasePlan, norm: nn.Module, ctx: Pass) -> Tensor:
        k, n = j - plan.first, len(plan.blocks)
        partial = state[n] if j % self.block_size else None
        qp = plan.queries[k]
        carry = None if ctx.chain is None else ctx.chain.carriers
        fuse = self._fuse(norm, ctx)
        w, dtype = (norm.weight, sublayer_dtype(state[0], qp.dtype)) if fuse else (None, None)
        o, _p, *out = merged_read(qp, plan.inter[k], plan.blocks, partial, w, self.eps, dtype, carry)
        self._pass_on(ctx, j, out)
        return o if fuse else norm(o)

    def _pass_on(self, ctx: Pass, j: int, out: list) -> None:
        """Keep read j's carriers of its completed sources (all but a partial sum) for the next read."""
        if ctx.chain is not None:
            carriers = out[0] or ()  # None: this read's implementation does not carry
            ctx.chain.carriers = carriers[: j // self.block_size + 1]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_sublayers={self.num_sublayers}, block_size={self.block_size}, "
                f"final_aggregation={self.final_aggregation})")


class FullAttnRes(BlockAttnRes):
    """Full AttnRes: every sublayer output is its own source (Block with S = 1)."""

    name = "full"

    def __init__(self, num_sublayers: int, final_aggregation: bool = True, eps: float = 1e-6):
        super().__init__(num_sublayers, 1, final_aggregation, eps)
