"""Triton kernels for the AttnRes read, forward and backward; same contract as ``_AttnResRead``.

Sources are passed as a pointer table: one small int64 tensor per launch, ``meta = [address, row
stride, dtype code, grad address, grad row stride]`` per source, each address cast to a typed
pointer inside the kernel. One launch then serves any source count L (a runtime loop bound, so
no recompile per L), nothing is stacked, sources may mix dtypes (a uniform branch on the dtype
code; none when all share one) and any [N, D] view with unit column stride is read in place.
A fixed number of pointer arguments per launch would instead need L-chunked launches merged
through an fp32 [N, D] accumulator in global memory. The cost: the table is built on the host per
call (one pinned, non-blocking copy), so the kernels cannot be captured in a CUDA graph.

A program owns a tile of BN tokens x BD features (BD = D rounded up to a power of two, at most
BLOCK_D_MAX; small D packs several tokens per tile). Math in fp32 (fp64 for fp64 sources).
- D <= BLOCK_D_MAX. Forward: one read of each source; the tile stays in registers and an online
  softmax over depth folds each source into the mix as soon as its logit is known. Backward: two
  reads (recompute h = sum_i p_i v_i; then per source dp_i, dv_i and dq'), one write of each
  gradient; dq' and dw are summed in registers over a grid-stride loop of row tiles.
- D > BLOCK_D_MAX: loops over D-chunks. Forward: two reads (logit sweep, then the mix; with the
  output norm h is parked in a scratch [N, D] until its rstd is known). Backward: three reads (the
  mix, parking h then dh in a scratch with the output norm; then per source a dot sweep for dp_i and
  a gradient sweep over the same, cache-hot row), dq'/dw partials read-modify-written per chunk.
Saved for backward: the sources (as views) and the statistics s, r, p [L, N] and the output norm's
rstd [N], in the compute dtype. Formulas: see the docstring of attn_res.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import source_dtype
from .cpu_kernel import OPS, op_merge, op_read
from .grads import Needs, Slots, carriers

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; triton_read then fails
    triton = None
TRITON_AVAILABLE = triton is not None

BLOCK_D_MAX = 4096  # widest register tile along D; wider D is chunked
_TILE = 4096  # elements per program tile (BN * BD)
_KIND = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 4, torch.float64: 8}  # one bit per dtype


def _jit(**kwargs):
    return triton.jit(**kwargs) if TRITON_AVAILABLE else (lambda fn: fn)


@_jit()
def _ptrs(meta, L, i, SLOT: tl.constexpr, rows, cols, K: tl.constexpr, ALIGNED: tl.constexpr):
    """[BN, BD] pointers into rows of tensor i of the table (SLOT 0: source, 3: gradient) of dtype code K."""
    addr = tl.load(meta + SLOT * L + i)
    stride = tl.load(meta + (SLOT + 1) * L + i)
    if K == 1:
        base = addr.to(tl.pointer_type(tl.float32))
        vec: tl.constexpr = 4
    elif K == 2:
        base = addr.to(tl.pointer_type(tl.bfloat16))
        vec: tl.constexpr = 8
    elif K == 4:
        base = addr.to(tl.pointer_type(tl.float16))
        vec: tl.constexpr = 8
    else:
        base = addr.to(tl.pointer_type(tl.float64))
        vec: tl.constexpr = 2
    if ALIGNED:  # rows start on 16 bytes: lets the compiler vectorise
        base = tl.multiple_of(base, 16)
        stride = tl.multiple_of(stride, vec)
    return base + rows[:, None] * stride + cols[None, :]


@_jit()
def _load_src(meta, L, i, rows, cols, mask, CT: tl.constexpr, KINDS: tl.constexpr, ALIGNED: tl.constexpr):
    """Tile of source i in the compute dtype (0 where masked)."""
    if (KINDS & (KINDS - 1)) == 0:  # one source dtype: no dispatch
        x = tl.load(_ptrs(meta, L, i, 0, rows, cols, KINDS, ALIGNED), mask=mask, other=0.0).to(CT)
    else:
        kind = tl.load(meta + 2 * L + i)
        x = tl.zeros(mask.shape, CT)
        for b in tl.static_range(4):
            if (KINDS >> b) & 1:
                if kind == (1 << b):
                    x = tl.load(_ptrs(meta, L, i, 0, rows, cols, 1 << b, ALIGNED), mask=mask, other=0.0).to(CT)
    return x


@_jit()
def _store_grad(meta, L, i, rows, cols, mask, x, KINDS: tl.constexpr, ALIGNED: tl.constexpr):
    """Write the gradient tile of source i in that source's dtype; address 0 means not needed."""
    if tl.load(meta + 3 * L + i) != 0:
        if (KINDS & (KINDS - 1)) == 0:
            tl.store(_ptrs(meta, L, i, 3, rows, cols, KINDS, ALIGNED), x, mask=mask)
        else:
            kind = tl.load(meta + 2 * L + i)
            for b in tl.static_range(4):
                if (KINDS >> b) & 1:
                    if kind == (1 << b):
                        tl.store(_ptrs(meta, L, i, 3, rows, cols, 1 << b, ALIGNED), x, mask=mask)


@_jit()
def _mix(meta, p_buf, L, N, rows, rmask, cols, mask, CT: tl.constexpr, KINDS: tl.constexpr, ALIGNED: tl.constexpr):
    """h = sum_i p_i v_i on one tile."""
    h = tl.zeros(mask.shape, CT)
    for i in range(L):
        p = tl.load(p_buf + i * N + rows, mask=rmask, other=0.0)
        h += p[:, None] * _load_src(meta, L, i, rows, cols, mask, CT, KINDS, ALIGNED)
    return h


@_jit(do_not_specialize=["L", "N"])
def _fwd_kernel(
    meta, qp, w, o, h_buf, s_buf, r_buf, p_buf, rh_buf, L, N, D, eps,
    KINDS: tl.constexpr, ALIGNED: tl.constexpr, HAS_W: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    CT = qp.dtype.element_ty
    rows = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    rmask = rows < N
    cols = tl.arange(0, BD)
    if ONE_CHUNK:  # the whole row tile in registers: one read of each source
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        q = tl.load(qp + cols, mask=cmask, other=0.0)
        m = tl.full([BN], float("-inf"), CT)
        l = tl.zeros([BN], CT)
        h = tl.zeros([BN, BD], CT)
        for i in range(L):
            v = _load_src(meta, L, i, rows, cols, mask, CT, KINDS, ALIGNED)
            r = tl.rsqrt(tl.sum(v * v, 1) / D + eps)
            s = tl.sum(v * q[None, :], 1) * r
            tl.store(s_buf + i * N + rows, s, mask=rmask)
            tl.store(r_buf + i * N + rows, r, mask=rmask)
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            e = tl.exp(s - m_new)
            l = l * alpha + e
            h = h * alpha[:, None] + e[:, None] * v
            m = m_new
        h = h / l[:, None]
        if HAS_W:
            rh = tl.rsqrt(tl.sum(h * h, 1) / D + eps)
            tl.store(rh_buf + rows, rh, mask=rmask)
            h = h * rh[:, None] * tl.load(w + cols, mask=cmask, other=0.0)[None, :]
        tl.store(o + rows[:, None] * D + cols[None, :], h.to(o.dtype.element_ty), mask=mask)
    else:  # sweep 1: logits and key rstd, D-chunk by D-chunk
        m = tl.full([BN], float("-inf"), CT)
        l = tl.zeros([BN], CT)
        for i in range(L):
            ss = tl.zeros([BN], CT)
            dot = tl.zeros([BN], CT)
            for c0 in range(0, D, BD):
                cmask = c0 + cols < D
                v = _load_src(meta, L, i, rows, c0 + cols, rmask[:, None] & cmask[None, :], CT, KINDS, ALIGNED)
                ss += tl.sum(v * v, 1)
                dot += tl.sum(v * tl.load(qp + c0 + cols, mask=cmask, other=0.0)[None, :], 1)
            r = tl.rsqrt(ss / D + eps)
            s = dot * r
            tl.store(s_buf + i * N + rows, s, mask=rmask)
            tl.store(r_buf + i * N + rows, r, mask=rmask)
            m_new = tl.maximum(m, s)
            l = l * tl.exp(m - m_new) + tl.exp(s - m_new)
            m = m_new
    lse = m + tl.log(l)
    tl.debug_barrier()  # s was written by other threads of this program
    for i in range(L):
        s = tl.load(s_buf + i * N + rows, mask=rmask, other=0.0)
        tl.store(p_buf + i * N + rows, tl.exp(s - lse), mask=rmask)
    if not ONE_CHUNK:  # sweep 2: the mix
        tl.debug_barrier()
        hss = tl.zeros([BN], CT)
        for c0 in range(0, D, BD):
            cmask = c0 + cols < D
            mask = rmask[:, None] & cmask[None, :]
            h = _mix(meta, p_buf, L, N, rows, rmask, c0 + cols, mask, CT, KINDS, ALIGNED)
            offs = rows[:, None] * D + c0 + cols[None, :]
            if HAS_W:
                hss += tl.sum(h * h, 1)
                tl.store(h_buf + offs, h, mask=mask)
            else:
                tl.store(o + offs, h.to(o.dtype.element_ty), mask=mask)
        if HAS_W:  # the output norm needs the whole row: scale the parked h
            rh = tl.rsqrt(hss / D + eps)
            tl.store(rh_buf + rows, rh, mask=rmask)
            tl.debug_barrier()
            for c0 in range(0, D, BD):
                cmask = c0 + cols < D
                mask = rmask[:, None] & cmask[None, :]
                offs = rows[:, None] * D + c0 + cols[None, :]
                h = tl.load(h_buf + offs, mask=mask, other=0.0) * rh[:, None]
                h = h * tl.load(w + c0 + cols, mask=cmask, other=0.0)[None, :]
                tl.store(o + offs, h.to(o.dtype.element_ty), mask=mask)


@_jit(do_not_specialize=["L", "N", "n_blocks"])
def _bwd_kernel(
    meta, qp, w, dy, dpo, s_buf, r_buf, p_buf, rh_buf, dh_buf, dq_part, dw_part, L, N, D, n_blocks,
    KINDS: tl.constexpr, ALIGNED: tl.constexpr, HAS_W: tl.constexpr, HAS_DP: tl.constexpr,
    ONE_CHUNK: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    CT = qp.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    if ONE_CHUNK:
        cmask = cols < D
        q = tl.load(qp + cols, mask=cmask, other=0.0)
        if HAS_W:
            wv = tl.load(w + cols, mask=cmask, other=0.0)
        dq_acc = tl.zeros([BD], CT)
        dw_acc = tl.zeros([BD], CT)
    for blk in range(pid, n_blocks, tl.num_programs(0)):
        rows = (blk * BN + tl.arange(0, BN)).to(tl.int64)
        rmask = rows < N
        # delta = sum_j p_j dp_j = <h, dh> + sum_j p_j dp_out_j, so ds_i = p_i (dp_i - delta)
        delta = tl.zeros([BN], CT)
        if HAS_DP:
            for i in range(L):
                pi = tl.load(p_buf + i * N + rows, mask=rmask, other=0.0)
                delta += pi * tl.load(dpo + i * N + rows, mask=rmask, other=0.0)
        if HAS_W:
            rh = tl.load(rh_buf + rows, mask=rmask, other=0.0)
        if ONE_CHUNK:
            mask = rmask[:, None] & cmask[None, :]
            dh = tl.load(dy + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(CT)
            h = _mix(meta, p_buf, L, N, rows, rmask, cols, mask, CT, KINDS, ALIGNED)
            if HAS_W:
                hn = h * rh[:, None]
                dw_acc += tl.sum(dh * hn, 0)
                dyw = dh * wv[None, :]
                coef = tl.sum(hn * dyw, 1) / D
                dh = (dyw - hn * coef[:, None]) * rh[:, None]
            delta += tl.sum(h * dh, 1)
            for i in range(L):
                v = _load_src(meta, L, i, rows, cols, mask, CT, KINDS, ALIGNED)
                pi = tl.load(p_buf + i * N + rows, mask=rmask, other=0.0)
                si = tl.load(s_buf + i * N + rows, mask=rmask, other=0.0)
                ri = tl.load(r_buf + i * N + rows, mask=rmask, other=0.0)
                dp = tl.sum(v * dh, 1)
                if HAS_DP:
                    dp += tl.load(dpo + i * N + rows, mask=rmask, other=0.0)
                c1 = pi * (dp - delta) * ri  # ds_i r_i
                c2 = -c1 * si * ri / D
                dv = pi[:, None] * dh + c1[:, None] * q[None, :] + c2[:, None] * v
                _store_grad(meta, L, i, rows, cols, mask, dv, KINDS, ALIGNED)
                dq_acc += tl.sum(c1[:, None] * v, 0)
        else:
            # pass A: h chunk by chunk -> <h, dy w> (or <h, dy>), |h|^2, dw; h parked in dh_buf
            hdy = tl.zeros([BN], CT)
            hh = tl.zeros([BN], CT)
            for c0 in range(0, D, BD):
                cmask = c0 + cols < D
                mask = rmask[:, None] & cmask[None, :]
                offs = rows[:, None] * D + c0 + cols[None, :]
                h = _mix(meta, p_buf, L, N, rows, rmask, c0 + cols, mask, CT, KINDS, ALIGNED)
                dyc = tl.load(dy + offs, mask=mask, other=0.0).to(CT)
                if HAS_W:
                    hdy += tl.sum(h * dyc * tl.load(w + c0 + cols, mask=cmask, other=0.0)[None, :], 1)
                    hh += tl.sum(h * h, 1)
                    tl.store(dh_buf + offs, h, mask=mask)
                    part = tl.load(dw_part + pid * D + c0 + cols, mask=cmask, other=0.0)
                    tl.store(dw_part + pid * D + c0 + cols, part + tl.sum(dyc * h * rh[:, None], 0), mask=cmask)
                else:
                    hdy += tl.sum(h * dyc, 1)
            if HAS_W:  # dh = rh (dy w - h rh coef) with coef = <h rh, dy w> / D, written over h
                coef = rh * hdy / D
                delta += rh * hdy - rh * rh * coef * hh
                tl.debug_barrier()
                for c0 in range(0, D, BD):
                    cmask = c0 + cols < D
                    mask = rmask[:, None] & cmask[None, :]
                    offs = rows[:, None] * D + c0 + cols[None, :]
                    dyw = tl.load(dy + offs, mask=mask, other=0.0).to(CT)
                    dyw = dyw * tl.load(w + c0 + cols, mask=cmask, other=0.0)[None, :]
                    h = tl.load(dh_buf + offs, mask=mask, other=0.0)
                    tl.store(dh_buf + offs, (dyw - h * (rh * coef)[:, None]) * rh[:, None], mask=mask)
                tl.debug_barrier()
                dh_src = dh_buf
            else:
                delta += hdy
                dh_src = dy
            # pass B, per source: dp_i over the row, then dv_i and dq' over the same (cache-hot) row
            for i in range(L):
                pi = tl.load(p_buf + i * N + rows, mask=rmask, other=0.0)
                si = tl.load(s_buf + i * N + rows, mask=rmask, other=0.0)
                ri = tl.load(r_buf + i * N + rows, mask=rmask, other=0.0)
                dp = tl.zeros([BN], CT)
                if HAS_DP:
                    dp += tl.load(dpo + i * N + rows, mask=rmask, other=0.0)
                for c0 in range(0, D, BD):
                    mask = rmask[:, None] & (c0 + cols < D)[None, :]
                    v = _load_src(meta, L, i, rows, c0 + cols, mask, CT, KINDS, ALIGNED)
                    dhc = tl.load(dh_src + rows[:, None] * D + c0 + cols[None, :], mask=mask, other=0.0).to(CT)
                    dp += tl.sum(v * dhc, 1)
                c1 = pi * (dp - delta) * ri
                c2 = -c1 * si * ri / D
                for c0 in range(0, D, BD):
                    cmask = c0 + cols < D
                    mask = rmask[:, None] & cmask[None, :]
                    v = _load_src(meta, L, i, rows, c0 + cols, mask, CT, KINDS, ALIGNED)
                    dhc = tl.load(dh_src + rows[:, None] * D + c0 + cols[None, :], mask=mask, other=0.0).to(CT)
                    q = tl.load(qp + c0 + cols, mask=cmask, other=0.0)
                    dv = pi[:, None] * dhc + c1[:, None] * q[None, :] + c2[:, None] * v
                    _store_grad(meta, L, i, rows, c0 + cols, mask, dv, KINDS, ALIGNED)
                    part = tl.load(dq_part + pid * D + c0 + cols, mask=cmask, other=0.0)
                    tl.store(dq_part + pid * D + c0 + cols, part + tl.sum(c1[:, None] * v, 0), mask=cmask)
                tl.debug_barrier()  # the partials are read back by other threads
    if ONE_CHUNK:
        tl.store(dq_part + pid * D + cols, dq_acc, mask=cmask)
        if HAS_W:
            tl.store(dw_part + pid * D + cols, dw_acc, mask=cmask)


@_jit(do_not_specialize=["L", "N", "S"])
def _phase1_kernel(
    meta, qs, s_buf, r_buf, o, m_buf, l_buf, L, N, D, S, eps,
    KINDS: tl.constexpr, ALIGNED: tl.constexpr, ONE_CHUNK: tl.constexpr, SP: tl.constexpr,
    BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Two-phase phase 1 on a tile of BN tokens: the S queries (padded to SP) scored against each block
    tile as it is loaded, s [S, L, N], r [L, N], and per query the online-softmax m, l [S, N] and the
    un-normalised mix o [S, N, D]. D <= BD: one read of each block (the S mixes rescaled online in
    registers); wider D: two sweeps (logits chunk by chunk, then the mixes chunk by chunk)."""
    CT = qs.dtype.element_ty
    rows = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    rmask = rows < N
    cols = tl.arange(0, BD)
    js = tl.arange(0, SP)
    jmask = js < S
    smask = jmask[:, None] & rmask[None, :]
    m = tl.full([SP, BN], float("-inf"), CT)
    l = tl.zeros([SP, BN], CT)
    if ONE_CHUNK:
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        q = tl.load(qs + js[:, None] * D + cols[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.zeros([SP, BN, BD], CT)
        for i in range(L):
            v = _load_src(meta, L, i, rows, cols, mask, CT, KINDS, ALIGNED)
            r = tl.rsqrt(tl.sum(v * v, 1) / D + eps)
            s = tl.sum(v[None, :, :] * q[:, None, :], 2) * r[None, :]
            tl.store(s_buf + (js[:, None] * L + i) * N + rows[None, :], s, mask=smask)
            tl.store(r_buf + i * N + rows, r, mask=rmask)
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            e = tl.exp(s - m_new)
            l = l * alpha + e
            acc = acc * alpha[:, :, None] + e[:, :, None] * v[None, :, :]
            m = m_new
        offs = (js[:, None, None] * N + rows[None, :, None]) * D + cols[None, None, :]
        tl.store(o + offs, acc, mask=smask[:, :, None] & cmask[None, None, :])
    else:
        for i in range(L):  # sweep 1: rstd and the S logits of each block, D-chunk by D-chunk
            ss = tl.zeros([BN], CT)
            dot = tl.zeros([SP, BN], CT)
            for c0 in range(0, D, BD):
                cmask = c0 + cols < D
                v = _load_src(meta, L, i, rows, c0 + cols, rmask[:, None] & cmask[None, :], CT, KINDS, ALIGNED)
                q = tl.load(qs + js[:, None] * D + c0 + cols[None, :], mask=jmask[:, None] & cmask[None, :],
                            other=0.0)
                ss += tl.sum(v * v, 1)
                dot += tl.sum(v[None, :, :] * q[:, None, :], 2)
            r = tl.rsqrt(ss / D + eps)
            s = dot * r[None, :]
            tl.store(s_buf + (js[:, None] * L + i) * N + rows[None, :], s, mask=smask)
            tl.store(r_buf + i * N + rows, r, mask=rmask)
            m_new = tl.maximum(m, s)
            l = l * tl.exp(m - m_new) + tl.exp(s - m_new)
            m = m_new
        tl.debug_barrier()  # s was written by other threads of this program
        for c0 in range(0, D, BD):  # sweep 2: the S mixes, each block chunk loaded once
            cmask = c0 + cols < D
            mask = rmask[:, None] & cmask[None, :]
            acc = tl.zeros([SP, BN, BD], CT)
            for i in range(L):
                s = tl.load(s_buf + (js[:, None] * L + i) * N + rows[None, :], mask=smask, other=0.0)
                v = _load_src(meta, L, i, rows, c0 + cols, mask, CT, KINDS, ALIGNED)
                acc += tl.exp(s - m)[:, :, None] * v[None, :, :]
            offs = (js[:, None, None] * N + rows[None, :, None]) * D + c0 + cols[None, None, :]
            tl.store(o + offs, acc, mask=smask[:, :, None] & cmask[None, None, :])
    tl.store(m_buf + js[:, None] * N + rows[None, :], m, mask=smask)
    tl.store(l_buf + js[:, None] * N + rows[None, :], l, mask=smask)


@_jit(do_not_specialize=["NB", "N"])
def _merge_kernel(
    qp, w, vp, vp_stride, o1, o1_stride, s1, r1, m1, l1, o, s_buf, r_buf, p_buf, rh_buf, NB, N, D, eps,
    HAS_P: tl.constexpr, HAS_W: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Two-phase merge on a tile of BN tokens: the partial sum vp's rstd and logit, the online-softmax
    merge with the phase-1 terms (o1, m1, l1), the output norm, and the joint read's s, r, p."""
    CT = qp.dtype.element_ty
    rows = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    rmask = rows < N
    cols = tl.arange(0, BD)
    big = tl.load(m1 + rows, mask=rmask, other=0.0)
    z = tl.load(l1 + rows, mask=rmask, other=1.0)
    ca = 1.0 / z
    cb = tl.zeros([BN], CT)
    if HAS_P:  # sweep 1: the partial sum's key rstd and logit
        ss = tl.zeros([BN], CT)
        dot = tl.zeros([BN], CT)
        for c0 in range(0, D, BD):
            cmask = c0 + cols < D
            v = tl.load(vp + rows[:, None] * vp_stride + c0 + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0).to(CT)
            ss += tl.sum(v * v, 1)
            dot += tl.sum(v * tl.load(qp + c0 + cols, mask=cmask, other=0.0)[None, :], 1)
        rp = tl.rsqrt(ss / D + eps)
        sp = dot * rp
        tl.store(s_buf + NB * N + rows, sp, mask=rmask)
        tl.store(r_buf + NB * N + rows, rp, mask=rmask)
        m = big
        big = tl.maximum(m, sp)
        a = tl.exp(m - big)
        b = tl.exp(sp - big)
        z = a * z + b
        ca = a / z
        cb = b / z
        tl.store(p_buf + NB * N + rows, cb, mask=rmask)
    for i in range(NB):  # the completed blocks' statistics, from phase 1
        si = tl.load(s1 + i * N + rows, mask=rmask, other=0.0)
        tl.store(s_buf + i * N + rows, si, mask=rmask)
        tl.store(r_buf + i * N + rows, tl.load(r1 + i * N + rows, mask=rmask, other=0.0), mask=rmask)
        tl.store(p_buf + i * N + rows, tl.exp(si - big) / z, mask=rmask)
    hss = tl.zeros([BN], CT)
    for c0 in range(0, D, BD):  # sweep 2: h = ca o1 + cb vp (written out unless the output norm needs |h|)
        cmask = c0 + cols < D
        mask = rmask[:, None] & cmask[None, :]
        h = tl.load(o1 + rows[:, None] * o1_stride + c0 + cols[None, :], mask=mask, other=0.0) * ca[:, None]
        if HAS_P:
            v = tl.load(vp + rows[:, None] * vp_stride + c0 + cols[None, :], mask=mask, other=0.0).to(CT)
            h += v * cb[:, None]
        if HAS_W:
            hss += tl.sum(h * h, 1)
        else:
            tl.store(o + rows[:, None] * D + c0 + cols[None, :], h.to(o.dtype.element_ty), mask=mask)
    if HAS_W:  # sweep 3: h recomputed, normalised, scaled by the gain
        rh = tl.rsqrt(hss / D + eps)
        tl.store(rh_buf + rows, rh, mask=rmask)
        for c0 in range(0, D, BD):
            cmask = c0 + cols < D
            mask = rmask[:, None] & cmask[None, :]
            h = tl.load(o1 + rows[:, None] * o1_stride + c0 + cols[None, :], mask=mask, other=0.0) * ca[:, None]
            if HAS_P:
                v = tl.load(vp + rows[:, None] * vp_stride + c0 + cols[None, :], mask=mask, other=0.0).to(CT)
                h += v * cb[:, None]
            h = h * rh[:, None] * tl.load(w + c0 + cols, mask=cmask, other=0.0)[None, :]
            tl.store(o + rows[:, None] * D + c0 + cols[None, :], h.to(o.dtype.element_ty), mask=mask)


def _rows(x: Tensor, d: int) -> Tensor:
    """x as an [N, D] view with unit column stride; a copy only if no such view exists."""
    f = x.reshape(-1, d)
    return f if f.stride(1) == 1 else f.contiguous()


def _meta(flat: Sequence[Tensor], grads: Sequence[Tensor | None] | None = None) -> tuple[Tensor, bool]:
    """The per-source table, on the sources' device, and whether every row starts on 16 bytes."""
    tabs = [flat] if grads is None else [flat, [g for g in grads if g is not None]]
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for ts in tabs for t in ts)
    vals = [t.data_ptr() for t in flat] + [t.stride(0) for t in flat] + [_KIND[t.dtype] for t in flat]
    if grads is not None:
        vals += [0 if g is None else g.data_ptr() for g in grads] + [0 if g is None else g.stride(0) for g in grads]
    dev = flat[0].device
    meta = torch.tensor(vals, dtype=torch.int64, pin_memory=dev.type == "cuda")
    return meta.to(dev, non_blocking=True), aligned


def _config(n: int, d: int) -> tuple[int, int, int]:
    """(BN, BD, num_warps) for n rows of d features."""
    bd = min(triton.next_power_of_2(d), BLOCK_D_MAX)
    bn = max(1, min(_TILE // bd, triton.next_power_of_2(n)))
    return bn, bd, min(16, max(1, bn * bd // 256))  # 8 elements per thread per tile


def _device(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _programs(dev: torch.device, n_blocks: int) -> int:
    """Backward grid: programs striding over row tiles, enough to fill the GPU (2 under the interpreter)."""
    per_device = 4 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
    return min(n_blocks, per_device)


def _check_dtypes(what: str, sources: Sequence[Tensor]) -> None:
    for v in sources:
        if v.dtype not in _KIND:
            raise TypeError(f"{what} supports fp32/bf16/fp16/fp64 sources, got {v.dtype}")


def _launch_read(qp: Tensor, w: Tensor | None, eps: float, sources: Sequence[Tensor], dtype: torch.dtype | None = None):
    """One forward launch: ``(o [N, D], s, r, p [L, N], rh [N] or None, flat)``, flat the sources as [N, D]; o in
    ``dtype`` (default the sources' promoted dtype)."""
    _check_dtypes("triton_read", sources)
    ct, d = qp.dtype, qp.shape[0]
    flat = [_rows(v, d) for v in sources]
    n, L = flat[0].shape[0], len(flat)
    o = torch.empty(n, d, dtype=dtype or source_dtype(sources), device=qp.device)
    s, r, p = (torch.empty(L, n, dtype=ct, device=qp.device) for _ in range(3))
    rh = None if w is None else torch.empty(n, dtype=ct, device=qp.device)
    if n > 0:
        bn, bd, warps = _config(n, d)
        one_chunk = d <= bd
        h_buf = None if w is None or one_chunk else torch.empty(n, d, dtype=ct, device=qp.device)
        meta, aligned = _meta(flat)
        kinds = sum({_KIND[v.dtype] for v in flat})
        with _device(qp):
            _fwd_kernel[(triton.cdiv(n, bn),)](
                meta, qp, w, o, h_buf, s, r, p, rh, L, n, d, eps,
                KINDS=kinds, ALIGNED=aligned, HAS_W=w is not None, ONE_CHUNK=one_chunk,
                BN=bn, BD=bd, num_warps=warps,
            )  # fmt: skip
    return o, s, r, p, rh, flat


class _TritonRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qp: Tensor, w: Tensor | None, eps: float, dtype: torch.dtype | None, *sources: Tensor):
        shape = sources[0].shape
        o, s, r, p, rh, flat = _launch_read(qp, w, eps, sources, dtype)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(qp, w, s, r, p, rh, *flat)
        ctx.shape = shape
        return o.view(shape), p.view(len(flat), *shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, dp_out: Tensor | None):
        return _SLOTS.grads(*_backward(ctx, dy, dp_out, _SLOTS.needs(ctx)))


_SLOTS = Slots.of_function(_TritonRead.forward)


def _backward(ctx, dy: Tensor | None, dp_out: Tensor | None, needs: Needs):
    """(dqp, dw, source grads) of the read from what its forward saved: (qp, w, s, r, p, rh, *flat) and
    ctx.shape; the read's and the two-phase merge's backward."""
    qp, w, s, r, p, rh, *flat = ctx.saved_tensors
    return _launch_backward(qp, w, s, r, p, rh, flat, dy, dp_out, needs, ctx.shape)


def _launch_backward(qp, w, s, r, p, rh, flat, dy, dp_out, needs: Needs, shape):
    """One backward launch from the forward's statistics: (dqp, dw, source grads of ``shape``)."""
    ct, d, (L, n), dev = qp.dtype, qp.shape[0], p.shape, qp.device
    dy = torch.zeros(n, d, dtype=ct, device=dev) if dy is None else dy.reshape(n, d).contiguous()
    dpo = None if dp_out is None else dp_out.reshape(L, n).to(ct).contiguous()
    grads = [torch.empty(n, d, dtype=f.dtype, device=dev) if needs.sources[i] else None for i, f in enumerate(flat)]
    bn, bd, warps = _config(n, d)
    one_chunk = d <= bd
    n_blocks = triton.cdiv(n, bn)
    progs = _programs(dev, n_blocks)
    part = torch.empty if one_chunk else torch.zeros  # the chunked path accumulates in place
    dq_part = part(progs, d, dtype=ct, device=dev)
    dw_part = None if w is None else part(progs, d, dtype=ct, device=dev)
    if progs > 0:
        dh_buf = None if w is None or one_chunk else torch.empty(n, d, dtype=ct, device=dev)
        meta, aligned = _meta(flat, grads)
        with _device(qp):
            _bwd_kernel[(progs,)](
                meta, qp, w, dy, dpo, s, r, p, rh, dh_buf, dq_part, dw_part, L, n, d, n_blocks,
                KINDS=sum({_KIND[f.dtype] for f in flat}), ALIGNED=aligned, HAS_W=w is not None,
                HAS_DP=dpo is not None, ONE_CHUNK=one_chunk, BN=bn, BD=bd, num_warps=warps,
            )  # fmt: skip
    dqp = dq_part.sum(0) if needs.qp else None
    dw = dw_part.sum(0) if w is not None and needs.w else None
    return dqp, dw, [None if g is None else g.view(shape) for g in grads]


def triton_read(qp: Tensor, w: Tensor | None, eps: float, sources: Sequence[Tensor],
                dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """The AttnRes read on the GPU: ``(o, p)`` as ``_AttnResRead.apply(qp, w, eps, dtype, *sources)`` returns them.

    qp: the folded query [D] (q * key-norm gain * scale) in the compute dtype (fp32, fp64 for fp64
    sources); w: the output RMSNorm gain [D] in the compute dtype, or None; sources: L >= 1 tensors
    of one shape [..., D] (fp32/bf16/fp16/fp64, mixed dtypes promote). o has the sources' shape and
    promoted dtype (or ``dtype``), p is [L, ...] in the compute dtype; both are differentiable.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton_read needs triton, which is not installed")
    if torch.compiler.is_compiling():
        return op_read(qp, w, eps, sources, dtype)
    return _TritonRead.apply(qp, w, float(eps), dtype, *sources)


def _launch_merge(qp: Tensor, w: Tensor | None, eps: float, s1: Tensor, r1: Tensor, o1: Tensor, m1: Tensor,
                  l1: Tensor, sources: Sequence[Tensor], dtype: torch.dtype | None = None):
    """One merge launch: ``(o [N, D], s, r, p [L, N], rh [N] or None, flat)`` as :func:`_launch_read`."""
    _check_dtypes("triton_merge", sources)
    ct, d = qp.dtype, qp.shape[0]
    flat = [_rows(v, d) for v in sources]
    n, L, nb = flat[0].shape[0], len(flat), s1.shape[0]
    if L not in (nb, nb + 1):
        raise ValueError(f"triton_merge: {L} sources for the phase-1 statistics of {nb} blocks")
    o = torch.empty(n, d, dtype=dtype or source_dtype(sources), device=qp.device)
    s, r, p = (torch.empty(L, n, dtype=ct, device=qp.device) for _ in range(3))
    rh = None if w is None else torch.empty(n, dtype=ct, device=qp.device)
    if n > 0:
        bn, bd, warps = _config(n, d)
        o1f = _rows(o1.to(ct), d)
        vp = flat[nb] if L > nb else o1f  # not read without a partial sum
        s1, r1, m1, l1 = (t.to(ct).contiguous() for t in (s1, r1, m1, l1))
        with _device(qp):
            _merge_kernel[(triton.cdiv(n, bn),)](
                qp, w, vp, vp.stride(0), o1f, o1f.stride(0), s1, r1, m1, l1, o, s, r, p, rh, nb, n, d, eps,
                HAS_P=L > nb, HAS_W=w is not None, BN=bn, BD=bd, num_warps=warps,
            )  # fmt: skip
    return o, s, r, p, rh, flat


class _TritonMerge(torch.autograd.Function):
    """The two-phase merged read (``two_phase.merged_read``) on the GPU: forward ``_merge_kernel``, backward
    the read's backward kernel on the joint read's statistics."""

    @staticmethod
    def forward(ctx, qp: Tensor, w: Tensor | None, eps: float, dtype: torch.dtype | None, s1: Tensor, r1: Tensor,
                o1: Tensor, m1: Tensor, l1: Tensor, *sources: Tensor):
        shape = sources[0].shape
        o, s, r, p, rh, flat = _launch_merge(qp, w, eps, s1, r1, o1, m1, l1, sources, dtype)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(qp, w, s, r, p, rh, *flat)
        ctx.shape = shape
        return o.view(shape), p.view(len(flat), *shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, dp_out: Tensor | None):
        return _MERGE_SLOTS.grads(*_backward(ctx, dy, dp_out, _MERGE_SLOTS.needs(ctx)))


_MERGE_SLOTS = Slots.of_function(_TritonMerge.forward)


def triton_merge(qp: Tensor, w: Tensor | None, eps: float, inter: Sequence[Tensor],
                 sources: Sequence[Tensor], dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(o, p)`` of the two-phase merged read over ``sources`` (the completed blocks, then the partial sum
    if any) from this query's phase-1 terms ``inter = (s [n, N], r [n, N], o [N, D], m [N], l [N])``; as
    ``cpu_kernel.merge`` / ``two_phase._MergedRead``, both outputs differentiable."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton_merge needs triton, which is not installed")
    if torch.compiler.is_compiling():
        return op_merge(qp, w, eps, inter, sources, dtype)
    return _TritonMerge.apply(qp, w, float(eps), dtype, *inter, *sources)


def triton_phase1(qs: Tensor, eps: float, blocks: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Phase 1 of two-phase Block AttnRes on the GPU (no autograd), as ``cpu_kernel.phase1``: folded
    queries ``qs`` [S, D] in the compute dtype against ``blocks`` (any mix of fp32/bf16/fp16, or fp64) ->
    ``(s [S, n, N], r [n, N], o [S, N, D], m [S, N], l [S, N])``."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton_phase1 needs triton, which is not installed")
    if torch.compiler.is_compiling():
        return OPS.phase1(qs, float(eps), list(blocks))
    _check_dtypes("triton_phase1", blocks)
    qs = qs.contiguous()
    (k, d), ct, dev = qs.shape, qs.dtype, qs.device
    flat = [_rows(v, d) for v in blocks]
    n, L = flat[0].shape[0], len(flat)
    s, r = torch.empty(k, L, n, dtype=ct, device=dev), torch.empty(L, n, dtype=ct, device=dev)
    o = torch.empty(k, n, d, dtype=ct, device=dev)
    m, l = torch.empty(k, n, dtype=ct, device=dev), torch.empty(k, n, dtype=ct, device=dev)
    if n > 0:
        sp = triton.next_power_of_2(k)
        bd = min(triton.next_power_of_2(d), BLOCK_D_MAX)
        bn = max(1, min(_TILE // (bd * sp), triton.next_power_of_2(n)))  # S x BN x BD accumulators per tile
        meta, aligned = _meta(flat)
        with _device(qs):
            _phase1_kernel[(triton.cdiv(n, bn),)](
                meta, qs, s, r, o, m, l, L, n, d, k, eps,
                KINDS=sum({_KIND[v.dtype] for v in flat}), ALIGNED=aligned, ONE_CHUNK=d <= bd, SP=sp,
                BN=bn, BD=bd, num_warps=min(16, max(1, sp * bn * bd // 256)),
            )  # fmt: skip
    return s, r, o, m, l


# ---- the CUDA kernels of the attnres:: ops (schemas, fakes and autograd: cpu_kernel.py) ----
# torch.compile calls these ops, like the CPU kernel's, when compiled CUDA reads are switched on
# (set_compiled); the default stays the traced PyTorch read for inductor until measured on a GPU.

_compiled = False


def set_compiled(flag: bool) -> None:
    """Whether ``torch.compile`` calls the Triton kernels (the ``attnres::`` ops on CUDA) instead of tracing
    the PyTorch read for inductor (the default). Read when a model is compiled (a change recompiles)."""
    global _compiled
    _compiled = bool(flag)


def compiled() -> bool:
    return _compiled


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _op_read_forward(qp, w, eps, sources, dtype=None, carry=None):
    o, s, r, p, rh, _flat = _launch_read(qp, w, eps, sources, dtype)
    return o.view(sources[0].shape), s, r, p, _empty_if_none(rh, qp), _carriers(sources, carry)


def _op_merge_forward(qp, w, eps, s1, r1, o1, m1, l1, sources, dtype=None, carry=None):
    o, s, r, p, rh, _flat = _launch_merge(qp, w, eps, s1, r1, o1, m1, l1, sources, dtype)
    return o.view(sources[0].shape), s, r, p, _empty_if_none(rh, qp), _carriers(sources, carry)


def _carriers(sources, carry) -> list[Tensor]:
    return [] if carry is None else list(carriers(sources))


def _op_read_stacked(qp, w, eps, bank, dtype=None):
    w = None if w is None else w.to(qp.dtype)
    return _launch_read(qp, w, eps, bank.unbind(0), dtype)[0].view(bank.shape[1:])


def _op_read_backward(qp, w, s, r, p, rh, dy, dp_out, sources, need_dq, need_dw, need_dv):
    flat = [_rows(v, qp.shape[0]) for v in sources]
    needs = Needs(bool(need_dq), bool(need_dw), tuple(bool(x) for x in need_dv))
    dqp, dw, grads = _launch_backward(qp, w, s, r, p, None if w is None else rh, flat, dy, dp_out, needs,
                                      sources[0].shape)
    return _empty_if_none(dqp, qp), _empty_if_none(dw, qp), [g for g in grads if g is not None]


OP_KERNELS = {
    "attnres::read_forward": _op_read_forward,
    "attnres::merge_forward": _op_merge_forward,
    "attnres::read_stacked": _op_read_stacked,
    "attnres::read_backward": _op_read_backward,
    "attnres::phase1": triton_phase1,
}
if TRITON_AVAILABLE:
    for _name, _fn in OP_KERNELS.items():
        torch.library.register_kernel(_name, "cuda", _fn)
