"""Residual schemes behind one interface: standard (PreNorm sum), full and block AttnRes."""

from __future__ import annotations

from .base import AttnResScheme, DepthRead, Norm, ResidualScheme, ResidualStream
from .block import BlockAttnRes
from .full import FullAttnRes
from .standard import StandardResidual

RESIDUALS = ("standard", "full", "block")


def build_residual(
    residual: str,
    hidden_size: int,
    num_sublayers: int,
    block_size: int | None = None,
    final_aggregation: bool = True,
) -> ResidualScheme:
    """Build a scheme by name; ``block_size`` (sublayers per block) is used by "block" only."""
    if residual == "standard":
        return StandardResidual(hidden_size, num_sublayers)
    if residual == "full":
        return FullAttnRes(hidden_size, num_sublayers, final_aggregation)
    if residual == "block":
        return BlockAttnRes(hidden_size, num_sublayers, block_size, final_aggregation)
    raise ValueError(f"unknown residual scheme {residual!r}; allowed: {', '.join(RESIDUALS)}")


__all__ = [
    "RESIDUALS",
    "AttnResScheme",
    "BlockAttnRes",
    "DepthRead",
    "FullAttnRes",
    "Norm",
    "ResidualScheme",
    "ResidualStream",
    "StandardResidual",
    "build_residual",
]
