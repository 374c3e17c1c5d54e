"""Two-phase Block AttnRes (PAPER §3.2, Algorithm 1).

Phase 1 runs once when a block opens: for all of the block's (static) pseudo-queries at once it
computes the un-normalised inter-block terms against the completed blocks b_0..b_{n-1}:
    s_{j,i} = <b_i, q'_j> r_i,  m_j = max_i s_{j,i},  l_j = sum_i e^{s_{j,i} - m_j},
    o_j = sum_i e^{s_{j,i} - m_j} b_i,
with each completed block read once for all S queries (its key rstd r_i, the S logits, the mix).
Phase 2, on each read, merges the intra-block partial sum b_n^i with an online-softmax update:
    m = max(m_j, s_p),  h = (e^{m_j-m} o_j + e^{s_p-m} b_n^i) / (e^{m_j-m} l_j + e^{s_p-m}).
This equals the joint softmax over [b_0, ..., b_{n-1}, b_n^i] exactly. Phase 1 is a forward-time
schedule: the read's backward is the joint read's, from the same per-token fp32 statistics.

On CPU (the fused kernel usable) phase 1 and the merge run in ``csrc/read_cpu.cpp`` (``cpu_kernel.phase1``
/ ``cpu_kernel.merge``; inside ``torch.compile`` the ops ``attnres::phase1`` / ``attnres::merge_forward``,
the latter with the read's backward registered); on CUDA with Triton ``triton_read.triton_phase1`` and
``triton_read.triton_merge`` (its backward the read's backward kernel); elsewhere PyTorch ops (``_MergedRead``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_kernel
from ._checks import compute_dtype, source_dtype
from .attn_res import _finish_forward, _flat, _read_backward, rstd
from .dispatch import CPU, TRITON, read_impl
from .grads import Slots


@dataclass
class InterBlock:
    """Phase-1 terms of one read against the completed blocks (all in the compute dtype, no autograd)."""

    s: Tensor  # [n, N] logits
    r: Tensor  # [n, N] key rstd (shared by the reads of one phase 1)
    o: Tensor  # [N, D] sum_i e^{s_i - m} b_i
    m: Tensor  # [N]
    l: Tensor  # [N]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.s, self.r, self.o, self.m, self.l


def key_rstd(v: Tensor, eps: float) -> Tensor:
    """rsqrt(mean(v^2) + eps) per token, [N] in fp32 (fp64 for fp64)."""
    return rstd(_flat(v.detach(), compute_dtype(v.dtype)), eps)


def _phase1_torch(qs: Tensor, blocks: Sequence[Tensor], eps: float) -> tuple[Tensor, ...]:
    """Phase 1 in PyTorch ops, each block up-cast once per sweep whatever S: the S logits in one
    [S, D] x [D, N] matmul, and o laid out [N, S, D] so that one broadcast multiply-add per block
    mixes it into all S outputs, each token row read once."""
    ct, (k, d), n = qs.dtype, qs.shape, len(blocks)
    rows = blocks[0].numel() // d
    s, r = qs.new_empty(k, n, rows), qs.new_empty(n, rows)
    for i, b in enumerate(blocks):  # sweep 1: key rstd and the S logits of each block
        bf = _flat(b, ct)
        r[i] = rstd(bf, eps)
        s[:, i] = torch.mm(qs, bf.t()).mul_(r[i])
    m = s.amax(1)  # [S, N]
    e = torch.exp(s - m[:, None])  # [S, n, N]
    o = qs.new_empty(rows, k, d)
    for i, b in enumerate(blocks):  # sweep 2: o[t, j] += e[j, i, t] b_i[t]
        bf, ei = _flat(b, ct)[:, None], e[:, i].t()[:, :, None]
        if i == 0:
            torch.mul(bf, ei, out=o)
        else:
            o.addcmul_(bf, ei)
    return s, r, o.transpose(0, 1), m, e.sum(1)


@torch.no_grad()
def phase1(queries: Tensor, blocks: Sequence[Tensor], eps: float) -> list[InterBlock]:
    """Inter-block terms for ``queries`` [S, D] (folded q' = q * g * scale, in the compute dtype) against
    ``blocks``, one :class:`InterBlock` per query. The fused CPU kernel reads each block once for all S
    queries (key rstd, logits, online-softmax statistics and the mix per token row); the PyTorch ops
    sweep each block twice (logits as one [S, D] x [D, N] matmul, then the mix)."""
    qs = queries.detach().contiguous()
    impl = read_impl(qs[0], blocks)
    if impl == CPU:
        s, r, o, m, l = cpu_kernel.phase1(qs, eps, blocks)
    elif impl == TRITON:
        from .triton_read import triton_phase1

        s, r, o, m, l = triton_phase1(qs, eps, blocks)
    else:
        with torch.autocast(queries.device.type, enabled=False):  # logits in the compute dtype, never bf16
            s, r, o, m, l = _phase1_torch(qs, blocks, eps)
    return [InterBlock(s[j], r, o[j], m[j], l[j]) for j in range(qs.shape[0])]


class _MergedRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qp: Tensor, w: Tensor | None, eps: float, dtype: torch.dtype | None, inter: InterBlock,
                *sources: Tensor):
        n = inter.s.shape[0]
        if len(sources) == n:  # first sublayer of the block: completed blocks only
            s, r, big, z = inter.s, inter.r, inter.m, inter.l
            h = inter.o / z[:, None]
        else:  # merge the partial sum b_n^i
            vp = _flat(sources[n], qp.dtype)
            r_p = rstd(vp, eps)
            s_p = torch.mv(vp, qp).mul_(r_p)
            big = torch.maximum(inter.m, s_p)
            a, b = torch.exp(inter.m - big), torch.exp(s_p - big)
            z = a * inter.l + b
            h = inter.o * (a / z)[:, None]
            h.addcmul_(vp, (b / z)[:, None])
            s, r = torch.cat([inter.s, s_p[None]]), torch.cat([inter.r, r_p[None]])
        p = torch.exp(s - big).div_(z)
        return _finish_forward(ctx, qp, w, eps, s, r, p, h, sources, dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, dp_out: Tensor | None):
        dqp, dw, grads = _read_backward(ctx, dy, dp_out, _SLOTS.needs(ctx))
        return _SLOTS.grads(dqp, dw, grads)


_SLOTS = Slots.of_function(_MergedRead.forward)


def merged_read(
    qp: Tensor, inter: InterBlock, blocks: Sequence[Tensor], partial: Tensor | None,
    output_rms_weight: Tensor | None = None, rms_eps: float = 1e-6, dtype: torch.dtype | None = None,
    carry: Sequence[Tensor] | None = None,
) -> tuple:
    """Phase 2: the read of folded query ``qp`` over ``[*blocks, partial]`` given its phase-1 terms.

    Returns ``(o, p)`` exactly as :func:`attnres.attn_res` (with ``return_weights=True``) over the
    same sources would, ``o`` in ``dtype`` if given. ``blocks`` must be the ones ``inter`` was computed from.
    ``carry``: as :func:`attnres.ops.attn_res.read`, ``(o, p, carriers)``.
    """
    sources = (*blocks, partial) if partial is not None else tuple(blocks)
    w = None if output_rms_weight is None else output_rms_weight.to(qp.dtype).contiguous()
    qp = qp.contiguous()
    impl = read_impl(qp, sources, w)
    if impl == CPU:  # forward and backward fused (the attnres:: ops when compiling)
        return cpu_kernel.merge(qp, w, float(rms_eps), inter.tensors(), sources, dtype, carry)
    if impl == TRITON:
        from .triton_read import triton_merge

        out = triton_merge(qp, w, float(rms_eps), inter.tensors(), sources, dtype)
    else:
        out = _MergedRead.apply(qp, w, float(rms_eps), dtype, inter, *sources)
    return out if carry is None else (*out, None)


def two_phase_attn_res(
    queries: Tensor, blocks: Sequence[Tensor], partials: Sequence[Tensor | None],
    rms_weights: Tensor | None = None, output_rms_weight: Tensor | None = None, rms_eps: float = 1e-6,
) -> list[Tensor]:
    """All reads of one block: ``queries`` [S, D], read j over ``[*blocks, partials[j]]``.

    A functional form of the schedule (phase 1 once, then a merge per read) for tests and users;
    the Block stream interleaves the same two calls with the sublayers.
    """
    qp = queries if rms_weights is None else queries * rms_weights
    qp = qp.to(compute_dtype(source_dtype(blocks)))
    inter = phase1(qp, blocks, rms_eps)
    return [merged_read(qp[j], inter[j], blocks, partials[j], output_rms_weight, rms_eps)[0]
            for j in range(qp.shape[0])]
