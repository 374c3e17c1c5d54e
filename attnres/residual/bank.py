"""The cached-decode state (``Mode.BANK``): every source lives in one preallocated bank.

Without autograd, Full and Block AttnRes keep their sources in slots of one ``[slots, *shape, D]``
tensor in the compute dtype: slot 0 is the embedding, slot n the n-th block (Full: the n-th sublayer
output). The state is ``(bank, embedding)`` (the embedding gives the activations' dtype). A write
copies into (first sublayer of a block) or adds into its slot in place, and a read is one fused
CPU-kernel call or a handful of batched ops over a view of the bank, whatever the source count. It
computes the same joint softmax as :func:`attnres.attn_res`. Block partial sums are kept in the compute
dtype, not rounded to the activation dtype as the stream's are: in bf16 a decode step can differ from
the full forward by that rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import cpu_kernel
from ..ops._checks import compute_dtype
from ..ops.dispatch import CPU, read_impl
from .base import State


def start(embedding: Tensor, slots: int) -> State:
    bank = embedding.new_empty(slots, *embedding.shape, dtype=compute_dtype(embedding.dtype))
    bank[0].copy_(embedding)
    return (bank, embedding)


def sources(state: State, j: int, block_size: int) -> Tensor:
    """The slots read before sublayer j: b_0..b_{n-1}, and the partial b_n^i when i > 0."""
    n, i = divmod(j, block_size)
    return state[0][: n + 1 + (i > 0)]


def write(state: State, j: int, out: Tensor, block_size: int) -> State:
    slot = state[0][1 + j // block_size]
    if j % block_size == 0:
        slot.copy_(out)
    else:
        slot.add_(out)
    return state


def read(state: State, v: Tensor, qp: Tensor | None, norm: nn.Module, eps: float, fuse: bool) -> Tensor:
    """Softmax read of folded query ``qp`` over the slots ``v`` (their plain sum if ``qp`` is None),
    then ``norm``: fused as the output gain when ``fuse``, else called as a module."""
    dtype, d = state[1].dtype, v.shape[-1]
    if qp is not None and read_impl(qp, [v]) == CPU:  # gain and output dtype handled in the kernel
        y = cpu_kernel.read_stacked(qp, norm.weight if fuse else None, eps, v, dtype)
        return y if fuse else norm(y)
    w = None
    if fuse:
        w = norm.weight if norm.weight.dtype == v.dtype else norm.weight.to(v.dtype)
    if qp is None:
        y = v.sum(0)
        y = F.rms_norm(y, (d,), w, eps) if fuse else y
    else:
        p = torch.softmax(F.rms_norm(v, (d,), eps=eps) @ qp, dim=0)
        y = (p.unsqueeze(-1) * v).sum(0)
        y = F.rms_norm(y, (d,), w, eps) if fuse else y
    y = y if y.dtype == dtype else y.to(dtype)
    return y if fuse else norm(y)
