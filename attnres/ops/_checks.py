"""Boundary validation shared by every implementation of the AttnRes read."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_read_inputs(
    query: Tensor,
    residuals: Tensor | Sequence[Tensor],
    rms_weight: Tensor | None,
    output_rms_weight: Tensor | None,
    rms_eps: float,
) -> tuple[int, int]:
    """Validate the public op's arguments; return (number of sources, D)."""
    if isinstance(residuals, Tensor):
        if residuals.dim() < 2:
            raise ValueError(
                f"stacked residuals must be [L, ..., D] with at least 2 dims, got shape {tuple(residuals.shape)}"
            )
        n, shape = residuals.shape[0], tuple(residuals.shape[1:])
        if n == 0:
            raise ValueError("residuals is empty: need at least one source, got a stacked tensor with L=0")
        dtypes = {residuals.dtype}
    elif isinstance(residuals, Sequence) and not isinstance(residuals, (str, bytes)):
        if len(residuals) == 0:
            raise ValueError("residuals is empty: need at least one source tensor")
        for i, r in enumerate(residuals):
            if not isinstance(r, Tensor):
                raise TypeError(f"residuals[{i}] must be a torch.Tensor, got {type(r).__name__}")
        shape = tuple(residuals[0].shape)
        for i, r in enumerate(residuals):
            if tuple(r.shape) != shape:
                raise ValueError(
                    f"all residuals must have the same shape [..., D]; residuals[0] is {shape}, "
                    f"residuals[{i}] is {tuple(r.shape)}"
                )
        n = len(residuals)
        dtypes = {r.dtype for r in residuals}
    else:
        raise TypeError(
            f"residuals must be a sequence of tensors or a stacked [L, ..., D] tensor, got {type(residuals).__name__}"
        )
    if len(shape) == 0:
        raise ValueError("each residual must have a feature dim D as its last dim, got 0-dim sources")
    d = shape[-1]
    if d == 0:
        raise ValueError(f"the feature dim D (last dim of the residuals) must be > 0, got shape {shape}")
    if not all(t.is_floating_point for t in dtypes):
        raise TypeError(f"residuals must have floating dtypes, got {sorted(map(str, dtypes))}")
    if not isinstance(query, Tensor):
        raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
    if tuple(query.shape) not in {(d,), (1, d), (d, 1)}:
        raise ValueError(f"query must have shape [D], [1, D] or [D, 1] with D={d}, got {tuple(query.shape)}")
    for name, w in (("rms_weight", rms_weight), ("output_rms_weight", output_rms_weight)):
        if w is not None and (not isinstance(w, Tensor) or tuple(w.shape) != (d,)):
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"{name} must be None or a tensor of shape [D]=({d},), got {got}")
    if not (isinstance(rms_eps, (int, float)) and rms_eps >= 0):
        raise ValueError(f"rms_eps must be a number >= 0, got {rms_eps!r}")
    return n, d


def source_dtype(sources: Sequence[Tensor]) -> torch.dtype:
    """The output dtype: the sources' promoted dtype (e.g. fp32 embedding + bf16 outputs under autocast -> fp32)."""
    dtype = sources[0].dtype
    for v in sources[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    return dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in fp32, or in fp64 when the sources are fp64 (the reference's test precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
