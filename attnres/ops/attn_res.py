"""The production AttnRes read.

Scores are folded: s_i = scale * <v_i, q*g> * rsqrt(mean(v_i^2) + eps), so normalised keys are
never materialised. Math in fp32 (fp64 for fp64 sources); the output is in the sources' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import check_read_inputs, compute_dtype


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
        ``o`` of shape ``[..., D]`` in the sources' dtype, or ``(o, p)``.
    """
    check_read_inputs(query, residuals, rms_weight, output_rms_weight, rms_eps)
    values = residuals if isinstance(residuals, Tensor) else torch.stack(list(residuals))
    out_dtype = values.dtype
    ct = compute_dtype(out_dtype)
    q = query.reshape(-1).to(ct)
    if rms_weight is not None:
        q = q * rms_weight.to(ct)
    v = values.to(ct)
    rstd = torch.rsqrt(v.pow(2).mean(-1) + rms_eps)
    logits = (v @ q) * rstd
    if scale != 1.0:
        logits = logits * scale
    p = torch.softmax(logits, dim=0)
    o = (p.unsqueeze(-1) * v).sum(0)
    if output_rms_weight is not None:
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + rms_eps) * output_rms_weight.to(ct)
    o = o.to(out_dtype)
    return (o, p) if return_weights else o
