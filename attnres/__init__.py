"""attnres: Attention Residuals (Kimi Team, 2026) for PyTorch and HF transformers."""

from .models import AttnResConfig, AttnResForCausalLM, AttnResModel
from .ops import attn_res, naive_attn_res
from .residual import DepthRead, build_residual

__version__ = "0.1.0"

__all__ = [
    "AttnResConfig",
    "AttnResForCausalLM",
    "AttnResModel",
    "DepthRead",
    "attn_res",
    "build_residual",
    "naive_attn_res",
]
