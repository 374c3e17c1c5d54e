"""Residual schemes behind one functional interface: standard (PreNorm sum), full and block AttnRes."""

from __future__ import annotations

from .base import DepthQuery, DepthRead, Mode, Pass, ResidualScheme, State
from .block import BlockAttnRes, FullAttnRes
from .norm import RMSNorm, fusable
from .standard import StandardResidual

RESIDUALS = ("standard", "full", "block")


def build_residual(
    residual: str,
    num_sublayers: int,
    block_size: int | None = None,
    final_aggregation: bool = True,
    eps: float = 1e-6,
) -> ResidualScheme:
    """Build a scheme by name; ``block_size`` (sublayers per block) is used by "block" only,
    ``eps`` is the key RMSNorm's epsilon."""
    if residual == "standard":
        return StandardResidual(num_sublayers, eps)
    if residual == "full":
        return FullAttnRes(num_sublayers, final_aggregation, eps)
    if residual == "block":
        return BlockAttnRes(num_sublayers, block_size, final_aggregation, eps)
    raise ValueError(f"unknown residual scheme {residual!r}; allowed: {', '.join(RESIDUALS)}")


__all__ = [
    "RESIDUALS",
    "BlockAttnRes",
    "DepthQuery",
    "DepthRead",
    "FullAttnRes",
    "Mode",
    "Pass",
    "RMSNorm",
    "ResidualScheme",
    "State",
    "StandardResidual",
    "build_residual",
    "fusable",
]
