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
