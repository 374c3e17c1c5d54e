"""The AttnRes read written to be obviously right (PAPER Eq. 2-4); the tests' oracle.

    k_i = RMSNorm(v_i) * g,  s_i = scale * <q, k_i>,  p = softmax_i(s),  o = sum_i p_i v_i

Keys are normalised, values are raw, the softmax runs over the source (depth) dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import check_read_inputs, compute_dtype, source_dtype


def _rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def naive_attn_res(
    query: Tensor,
    residuals: Tensor | Sequence[Tensor],
    rms_weight: Tensor | None = None,
    output_rms_weight: Tensor | None = None,
    rms_eps: float = 1e-6,
    scale: float = 1.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference AttnRes read; same signature and result as :func:`attnres.attn_res`."""
    check_read_inputs(query, residuals, rms_weight, output_rms_weight, rms_eps)
    sources = list(residuals.unbind(0)) if isinstance(residuals, Tensor) else list(residuals)
    out_dtype = source_dtype(sources)
    ct = compute_dtype(out_dtype)
    v = torch.stack([s.to(ct) for s in sources])
    q = query.reshape(-1).to(ct)
    k = _rms_norm(v, None if rms_weight is None else rms_weight.to(ct), rms_eps)
    logits = torch.einsum("d,l...d->l...", q, k) * scale
    p = torch.softmax(logits, dim=0)
    o = torch.einsum("l...,l...d->...d", p, v)
    if output_rms_weight is not None:
        o = _rms_norm(o, output_rms_weight.to(ct), rms_eps)
    o = o.to(out_dtype)
    return (o, p) if return_weights else o
