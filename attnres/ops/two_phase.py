"""Two-phase Block AttnRes (PAPER §3.2, Algorithm 1).

Phase 1 runs once when a block opens: for all of the block's (static) pseudo-queries at once it
computes the un-normalised inter-block terms against the completed blocks b_0..b_{n-1}:
    s_{j,i} = <b_i, q'_j> r_i,  m_j = max_i s_{j,i},  l_j = sum_i e^{s_{j,i} - m_j},
    o_j = sum_i e^{s_{j,i} - m_j} b_i,
with each completed block's key rstd r_i computed once (the caller caches it). Phase 2, on each
read, merges the intra-block partial sum b_n^i with an online-softmax update:
    m = max(m_j, s_p),  h = (e^{m_j-m} o_j + e^{s_p-m} b_n^i) / (e^{m_j-m} l_j + e^{s_p-m}).
This equals the joint softmax over [b_0, ..., b_{n-1}, b_n^i] exactly. Phase 1 is a forward-time
schedule: the read's backward is the joint read's, from the same per-token fp32 statistics.
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
from .dispatch import CPU, read_impl
from .grads import Slots


@dataclass
class InterBlock:
    """Phase-1 terms of one read against the completed blocks (all fp32, no autograd)."""

    s: Tensor  # [n, N] logits
    r: Tensor  # [n, N] key rstd
    o: Tensor  # [N, D] sum_i e^{s_i - m} b_i
    m: Tensor  # [N]
    l: Tensor  # [N]


def key_rstd(v: Tensor, eps: float) -> Tensor:
    """rsqrt(mean(v^2) + eps) per token, [N] in fp32 (fp64 for fp64)."""
    return rstd(_flat(v.detach(), compute_dtype(v.dtype)), eps)


def _logits(qs: Tensor, blocks: Sequence[Tensor], rstd: Sequence[Tensor], ct: torch.dtype) -> Tensor:
    return torch.stack([torch.mm(_flat(b, ct), qs.t()).t() * r for b, r in zip(blocks, rstd, strict=True)], 1)


@torch.no_grad()
def phase1(queries: Tensor, blocks: Sequence[Tensor], rstd: Sequence[Tensor]) -> list[InterBlock]:
    """Inter-block terms for ``queries`` [S, D] (folded q' = q * g * scale) against ``blocks``."""
    ct = queries.dtype
    qs = queries.detach()
    with torch.autocast(queries.device.type, enabled=False):  # logits in the compute dtype, never bf16
        s = _logits(qs, blocks, rstd, ct)
    m = s.amax(1)  # [S, N]
    e = torch.exp(s - m[:, None])  # [S, n, N]
    l = e.sum(1)
    r_all = torch.stack(list(rstd))
    out = []
    for j in range(qs.shape[0]):
        o = _flat(blocks[0], ct) * e[j, 0, :, None]
        for i in range(1, len(blocks)):
            o.addcmul_(_flat(blocks[i], ct), e[j, i, :, None])
        out.append(InterBlock(s[j], r_all, o, m[j], l[j]))
    return out


class _MergedRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qp: Tensor, w: Tensor | None, eps: float, inter: InterBlock, *sources: Tensor):
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
        ctx.fused_backward = read_impl(qp, sources, w) == CPU
        return _finish_forward(ctx, qp, w, eps, s, r, p, h, sources)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, dp_out: Tensor | None):
        needs = _SLOTS.needs(ctx)
        if ctx.fused_backward:
            dqp, dw, grads = cpu_kernel.backward(ctx, dy, dp_out, needs)
        else:
            dqp, dw, grads = _read_backward(ctx, dy, dp_out, needs)
        return _SLOTS.grads(dqp, dw, grads)


_SLOTS = Slots.of_function(_MergedRead.forward)


def merged_read(
    qp: Tensor, inter: InterBlock, blocks: Sequence[Tensor], partial: Tensor | None,
    output_rms_weight: Tensor | None = None, rms_eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Phase 2: the read of folded query ``qp`` over ``[*blocks, partial]`` given its phase-1 terms.

    Returns ``(o, p)`` exactly as :func:`attnres.attn_res` (with ``return_weights=True``) over the
    same sources would. ``blocks`` must be the ones ``inter`` was computed from.
    """
    sources = (*blocks, partial) if partial is not None else tuple(blocks)
    w = None if output_rms_weight is None else output_rms_weight.to(qp.dtype).contiguous()
    return _MergedRead.apply(qp.contiguous(), w, float(rms_eps), inter, *sources)


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
    inter = phase1(qp, blocks, [key_rstd(b, rms_eps) for b in blocks])
    return [merged_read(qp[j], inter[j], blocks, partials[j], output_rms_weight, rms_eps)[0]
            for j in range(qp.shape[0])]
