"""The PreNorm RMSNorm, and when a read may fuse it."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from ..ops._checks import compute_dtype


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 (as Llama's; fp64 stays fp64)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(compute_dtype(x.dtype))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def fusable(norm: nn.Module) -> bool:
    """Whether an AttnRes read may apply ``norm`` itself (as its output gain) instead of calling it.

    Only attnres's own :class:`RMSNorm`, exactly, with no hooks on it or on every module: any other
    norm (a LayerNorm, a patched kernel, a subclass, a module someone hooks) is called as a module.
    """
    return (type(norm) is RMSNorm and not norm._forward_pre_hooks and not norm._forward_hooks
            and not _module._global_forward_pre_hooks and not _module._global_forward_hooks)


def sublayer_dtype(x: Tensor, ct: torch.dtype) -> torch.dtype | None:
    """The dtype a fused read writes a sublayer's input in, or None for the sources' own.

    Under autocast the sublayers (attention, MLP) open with matmuls, which cast their fp32 input to the
    autocast dtype: a read computing in fp32 (``ct``) writes that dtype itself, the same values rounded once,
    half the bytes written and read, and its gradient arrives in it (not through a cast back to fp32).
    """
    dev = x.device.type
    if ct != torch.float32 or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)
