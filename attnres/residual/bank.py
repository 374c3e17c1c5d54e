"""The inference stream for small inputs (decode steps): every source lives in one preallocated bank.

Without autograd, Full and Block AttnRes keep their sources in slots of one ``[sources, N, D]``
tensor: slot 0 is the embedding, slot n the n-th block (Full: the n-th sublayer output). A write
copies into (first sublayer of a block) or adds into its slot in place, and a read is a handful of
batched ops over a view of the bank (one call of the fused CPU kernel where it applies), whatever
the source count: no per-read stacking, no per-source Python loop. It computes the same joint
softmax as :func:`attnres.attn_res`. The bank is in the compute dtype (fp32 for bf16/fp16 models), so
Block partial sums are not rounded to the activation dtype as the autograd stream's are: in low precision
a decode step can differ from the full forward by that rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import cpu_kernel
from ..ops._checks import compute_dtype
from .base import AttnResScheme, Norm, ResidualStream

# below this many tokens a no-grad forward uses the bank (one decode step is batch x 1 tokens)
BANK_MAX_TOKENS = 64


def use_bank(scheme: AttnResScheme, embedding: Tensor) -> bool:
    tokens = embedding.numel() // embedding.shape[-1]
    return tokens < BANK_MAX_TOKENS and not torch.is_grad_enabled() and scheme._records is None


class BankStream(ResidualStream):
    def __init__(self, scheme: AttnResScheme, embedding: Tensor, block_size: int):
        self.scheme, self.block_size = scheme, block_size
        self.dtype = embedding.dtype
        ct = compute_dtype(embedding.dtype)
        n = scheme.num_sublayers
        self.bank = embedding.new_empty(2 + (n - 1) // block_size, *embedding.shape, dtype=ct)
        self.bank[0].copy_(embedding)
        self.queries = scheme.folded_queries(0, len(scheme.pseudo_query), ct).unbind(0)
        self.count = 0
        self.fused = cpu_kernel.usable(self.queries[0], [self.bank])  # one C++ call per read (w cast to ct)

    def _read(self, row: int, norm: Norm) -> Tensor:
        """Read with query ``row`` over the sources written so far."""
        i, n = self.count % self.block_size, self.count // self.block_size
        v = self.bank[: n + 1 + (i > 0)]  # b_0..b_{n-1}, and the partial b_n^i when i > 0
        d = v.shape[-1]
        w = norm.weight if norm.weight.dtype == v.dtype else norm.weight.to(v.dtype)
        if row == self.scheme.num_sublayers and not self.scheme.final_aggregation:
            y = F.rms_norm(v.sum(0), (d,), w, norm.eps)
        elif self.fused:
            y = cpu_kernel.load().read_forward_stacked(self.queries[row], w, norm.eps, v)
        else:
            p = torch.softmax(F.rms_norm(v, (d,), eps=norm.eps) @ self.queries[row], dim=0)
            y = F.rms_norm((p.unsqueeze(-1) * v).sum(0), (d,), w, norm.eps)
        return y if y.dtype == self.dtype else y.to(self.dtype)

    def read(self, norm: Norm) -> Tensor:
        if self.count >= self.scheme.num_sublayers:
            raise RuntimeError(f"read point {self.count} does not exist: the scheme has "
                               f"{self.scheme.num_sublayers} sublayers")
        return self._read(self.count, norm)

    def write(self, out: Tensor) -> None:
        slot = self.bank[1 + self.count // self.block_size]
        if self.count % self.block_size == 0:
            slot.copy_(out)
        else:
            slot.add_(out)
        self.count += 1

    def finish(self, norm: Norm) -> Tensor:
        return self._read(self.scheme.num_sublayers, norm)
