"""Which implementation runs a read: one decision, from explicit inputs.

- CUDA tensors: the Triton kernel (``triton_read``) when Triton is installed; inside ``torch.compile``
  the PyTorch ops (inductor fuses them), or the Triton kernels as the ``attnres::`` ops after
  ``triton_read.set_compiled(True)`` (not yet measured on a GPU, so not the default);
- CPU: the fused C++ kernel (``cpu_kernel``) for contiguous sources (fp32/bf16/fp16 in any mix, or all
  fp64) when it is built and not turned off; inside ``torch.compile`` through its ``attnres::`` custom
  ops, unless ``cpu_kernel.set_compiled(False)``;
- otherwise the PyTorch ops (``attn_res._AttnResRead``), which compute the same function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import cpu_kernel

TORCH, CPU, TRITON = "torch", "cpu", "triton"


def read_impl(qp: Tensor, sources: Sequence[Tensor], w: Tensor | None = None) -> str:
    """The implementation for a read of folded query ``qp`` over ``sources`` (output gain ``w``)."""
    if qp.is_cuda:
        from . import triton_read

        if not triton_read.TRITON_AVAILABLE:
            return TORCH
        return TRITON if triton_read.compiled() or not torch.compiler.is_compiling() else TORCH
    return CPU if cpu_kernel.usable(qp, sources, w) else TORCH
