"""Residual schemes behind one functional interface (``base.py``), one file each, listed in ``registry.py``:
standard (PreNorm sum), full and block AttnRes (with the paper's Table 4 ablations, ``ablation.py``),
denseformer, hc, mhc, mhc_lite, delta, and the misreadings residual_scale, realformer, depth_mha."""

from __future__ import annotations

from .ablation import AblatedAttnRes
from .base import Chain, DepthQuery, DepthRead, Mode, Pass, ResidualParams, ResidualScheme, ScoreBias, State
from .block import BlockAttnRes, FullAttnRes
from .delta import DeltaAttnRes
from .denseformer import DenseFormer
from .depth_mha import DepthMHA
from .hc import HyperConnections
from .keys import Key, ModelDims
from .mhc import ManifoldHyperConnections
from .mhc_lite import MHCLite
from .norm import RMSNorm, fusable
from .realformer import RealFormer
from .registry import REGISTRY, RESIDUALS
from .registry import build as build_scheme
from .residual_scale import ResidualScale
from .standard import StandardResidual


def build_residual(
    residual: str,
    num_sublayers: int,
    block_size: int | None = None,
    final_aggregation: bool = True,
    eps: float = 1e-6,
    *,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    **options,
) -> ResidualScheme:
    """Build a scheme by name (``RESIDUALS``). ``block_size`` (sublayers per block) is used by "block" only,
    ``eps`` is the model's RMSNorm epsilon, ``options`` are the scheme's config keys (``REGISTRY[name].keys``)."""
    dims = ModelDims(num_sublayers, hidden_size, num_attention_heads, eps,
                     1 if residual == "full" else block_size, final_aggregation)
    return build_scheme(residual, dims, options)


__all__ = [
    "REGISTRY",
    "RESIDUALS",
    "AblatedAttnRes",
    "BlockAttnRes",
    "Chain",
    "DeltaAttnRes",
    "DenseFormer",
    "DepthMHA",
    "DepthQuery",
    "DepthRead",
    "FullAttnRes",
    "HyperConnections",
    "Key",
    "MHCLite",
    "ManifoldHyperConnections",
    "Mode",
    "ModelDims",
    "Pass",
    "RMSNorm",
    "RealFormer",
    "ResidualParams",
    "ResidualScale",
    "ResidualScheme",
    "ScoreBias",
    "State",
    "StandardResidual",
    "build_residual",
    "build_scheme",
    "fusable",
]
