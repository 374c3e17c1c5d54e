"""The production AttnRes read: a memory-lean custom autograd function.

Scores are folded, s_i = <v_i, q'> * r_i with q' = scale * q * g and r_i = rsqrt(mean(v_i^2) + eps),
so normalised keys are never materialised, and the sources are never stacked. Backward keeps
only references to the sources and per-token fp32 statistics (weights p, r_i, and the output
norm's r) and recomputes the rest. Math in fp32 (fp64 for fp64 sources); output in the sources'
dtype, or in a ``dtype`` asked for (rounded once from the fp32 result; the gradient read in it).

Gradients (per token; h = sum_i p_i v_i, dh the gradient of h):
    ds_i  = p_i * (<v_i, dh> - sum_j p_j <v_j, dh>)          (+ the gradient of p if returned)
    dv_i  = p_i dh + ds_i r_i q' - ds_i s_i r_i^2 / D * v_i
    dq'   = sum_tokens sum_i ds_i r_i v_i
With the output norm y = w * h * r_h:  dh = r_h (dy w - h r_h^2 mean(h * dy w)),  dw = sum dy h r_h.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_kernel
from ._checks import check_read_inputs, compute_dtype, source_dtype
from .dispatch import CPU, TRITON, read_impl
from .grads import Needs, Slots


def _flat(v: Tensor, ct: torch.dtype) -> Tensor:
    return v.reshape(-1, v.shape[-1]).to(ct)


def rstd(x: Tensor, eps: float) -> Tensor:
    """rsqrt(mean(x^2) + eps) over the last dim of a 2-D ``x``: [N]."""
    return torch.linalg.vector_norm(x, dim=-1).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


def _stats(sources: Sequence[Tensor], qp: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Logits s [L, N], key rstd r [L, N] and weights p [L, N]: one read of each source."""
    rows = sources[0].numel() // qp.shape[0]
    s = qp.new_empty(len(sources), rows)
    r = qp.new_empty(len(sources), rows)
    for i, v in enumerate(sources):
        vf = _flat(v, qp.dtype)
        r[i] = rstd(vf, eps)
        torch.mv(vf, qp, out=s[i])
        s[i].mul_(r[i])
    return s, r, torch.softmax(s, dim=0)


def _mix(sources: Sequence[Tensor], p: Tensor, ct: torch.dtype) -> Tensor:
    """h = sum_i p_i v_i, [N, D] in the compute dtype."""
    h = _flat(sources[0], ct) * p[0, :, None]
    for i in range(1, len(sources)):
        h.addcmul_(_flat(sources[i], ct), p[i, :, None])
    return h


def _finish_forward(ctx, qp, w, eps, s, r, p, h, sources, dtype=None):
    """Apply the optional output norm, save what backward needs, return (o, p) shaped like the sources, o in
    ``dtype`` (default the sources' promoted dtype)."""
    rh = None
    if w is not None:
        rh = rstd(h, eps)
        h.mul_(rh[:, None]).mul_(w)
    ctx.save_for_backward(qp, w, s, r, p, rh, *sources)
    shape = sources[0].shape
    return h.to(dtype or source_dtype(sources)).reshape(shape), p.reshape(len(sources), *shape[:-1])


def _read_backward(ctx, dy: Tensor | None, dp_out: Tensor | None, needs: Needs):
    """Gradient of the joint-softmax read w.r.t. (q', w, *sources), from the saved statistics."""
    qp, w, s, r, p, rh, *sources = ctx.saved_tensors
    ct, d = qp.dtype, qp.shape[0]
    dw = None
    if dy is None:
        dh = torch.zeros(p.shape[1], d, dtype=ct, device=qp.device)
    else:
        dh = _flat(dy, ct)
        if w is not None:
            hn = _mix(sources, p, ct).mul_(rh[:, None])  # h * r_h, recomputed
            dyw = dh * w
            dw = (dh * hn).sum(0) if needs.w else None
            coef = torch.linalg.vecdot(hn, dyw).div_(d)
            dh = dyw.sub_(hn.mul_(coef[:, None])).mul_(rh[:, None])
    dp = torch.empty_like(p)
    for i, v in enumerate(sources):
        torch.linalg.vecdot(_flat(v, ct), dh, out=dp[i])
    if dp_out is not None:
        dp += dp_out.reshape(len(sources), -1).to(ct)
    ds = p * (dp - (p * dp).sum(0, keepdim=True))
    c1 = ds * r  # coefficient of q' in dv, and of v in dq'
    c2 = ds * s * r * r / -d  # coefficient of v in dv
    dqp = torch.zeros_like(qp) if needs.qp else None
    grads = []
    for i, v in enumerate(sources):
        vf = _flat(v, ct)
        if dqp is not None:
            dqp.addmv_(vf.t(), c1[i])
        if needs.sources[i]:
            dv = dh * p[i, :, None]
            dv.addr_(c1[i], qp)
            dv.addcmul_(vf, c2[i, :, None])
            grads.append(dv.to(v.dtype).reshape(v.shape))
        else:
            grads.append(None)
    return dqp, dw, grads


class _AttnResRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qp: Tensor, w: Tensor | None, eps: float, dtype: torch.dtype | None, *sources: Tensor):
        s, r, p = _stats(sources, qp, eps)
        return _finish_forward(ctx, qp, w, eps, s, r, p, _mix(sources, p, qp.dtype), sources, dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, dp_out: Tensor | None):
        dqp, dw, grads = _read_backward(ctx, dy, dp_out, _SLOTS.needs(ctx))
        return _SLOTS.grads(dqp, dw, grads)


_SLOTS = Slots.of_function(_AttnResRead.forward)


def attn_res(
    query: Tensor,
    residuals: Tensor | Sequence[Tensor],
    rms_weight: Tensor | None = None,
    output_rms_weight: Tensor | None = None,
    rms_eps: float = 1e-6,
    scale: float = 1.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax over depth: mix ``residuals`` with weights from a static pseudo-query.

    Args:
        query: the pseudo-query w_l, shape ``[D]``, ``[1, D]`` or ``[D, 1]``.
        residuals: the sources, oldest first (embedding, completed blocks, running partial):
            a sequence of ``[..., D]`` tensors or one stacked ``[L, ..., D]`` tensor.
        rms_weight: gain of the key RMSNorm, ``[D]`` (None = ones).
        output_rms_weight: if given, RMSNorm the output with this gain ``[D]`` (the next
            sublayer's PreNorm, fused into the read).
        rms_eps: epsilon of both RMSNorms: ``x * rsqrt(mean(x^2) + eps)``.
        scale: multiplies the logits (1.0 in the paper: no 1/sqrt(D), no temperature).
        return_weights: also return the depth weights ``p`` of shape ``[L, ...]`` (fp32).

    Returns:
        ``o`` of shape ``[..., D]`` in the sources' (promoted) dtype, or ``(o, p)``.
    """
    check_read_inputs(query, residuals, rms_weight, output_rms_weight, rms_eps)
    sources = residuals.unbind(0) if isinstance(residuals, Tensor) else tuple(residuals)
    ct = compute_dtype(source_dtype(sources))
    qp = query.reshape(-1).to(ct)
    if rms_weight is not None:
        qp = qp * rms_weight.to(ct)
    if scale != 1.0:
        qp = qp * scale
    w = None if output_rms_weight is None else output_rms_weight.to(ct)
    o, p = read(qp, w, float(rms_eps), sources)
    return (o, p) if return_weights else o


def read(qp: Tensor, w: Tensor | None, eps: float, sources: Sequence[Tensor],
         dtype: torch.dtype | None = None, carry: Sequence[Tensor] | None = None) -> tuple:
    """The read with folded query ``qp`` (compute dtype), unchecked, by the implementation
    :func:`attnres.ops.dispatch.read_impl` picks; ``o`` in ``dtype`` (default the sources' promoted dtype).

    With ``carry`` (``grads.py``: the carriers of the first ``len(carry)`` sources, from the previous carried
    read over them; ``()`` to start): ``(o, p, carriers)``, carriers None where the implementation (only the
    fused CPU kernel carries) does not, and the next read starts afresh."""
    impl = read_impl(qp, sources, w)
    if impl == CPU:
        return cpu_kernel.read(qp, w, eps, sources, dtype, carry)
    if impl == TRITON:
        from .triton_read import triton_read

        out = triton_read(qp, w, eps, sources, dtype)
    else:
        out = _AttnResRead.apply(qp, w, eps, dtype, *sources)
    return out if carry is None else (*out, None)
