"""The fused CPU read (``csrc/read_cpu.cpp``): one pass over the sources per token, forward and backward.

Built with ``torch.utils.cpp_extension.load`` by :func:`prepare` (an AttnRes model calls it when it is
built, so no forward blocks on it; about a minute, once; cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``). ``ATTNRES_CPU_KERNEL=0`` in the environment when attnres is imported
turns it off (:func:`set_enabled` at run time); if the build fails one warning is printed and the
PyTorch implementation, which computes the same function, is used. ``attnres.ops.dispatch`` decides
which reads it takes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_SOURCE = Path(__file__).with_name("csrc") / "read_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd"]
_lock = threading.Lock()
_ext = None
_failed: str | None = None


def _name() -> str:
    """Extension name keyed by the CPU's feature flags, torch version and this installation (interpreter
    prefix and package path): ``-march=native`` builds must not be shared between CPUs, and two checkouts
    or venvs sharing the cache directory must not rebuild over each other's build."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    key = "|".join([platform.machine(), platform.processor(), flags, torch.__version__, *_FLAGS,
                    sys.prefix, str(_SOURCE.resolve())])
    return "attnres_read_cpu_" + hashlib.sha1(key.encode()).hexdigest()[:12]


_enabled = os.environ.get("ATTNRES_CPU_KERNEL", "1") != "0"  # read once, at import


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn the fused kernel on or off for this process (tests, benchmarks)."""
    global _enabled
    _enabled = bool(flag)


def prepare() -> bool:
    """Build (or load) the extension now, before any forward; True if it is usable."""
    return load() is not None


def load():
    """The compiled extension, building it on first call; None if disabled or the build failed."""
    global _ext, _failed
    if _ext is not None or _failed is not None or not _enabled:
        return _ext
    with _lock:
        if _ext is None and _failed is None:
            from torch.utils import cpp_extension

            name = _name()
            built = Path(cpp_extension._get_build_directory(name, False), f"{name}.so")
            if not built.exists() or built.stat().st_mtime < _SOURCE.stat().st_mtime:
                print(f"[attnres] building the fused CPU read (once per installation, ~30-60 s) in {built.parent}",
                      file=sys.stderr, flush=True)
            try:
                _ext = cpp_extension.load(
                    name=name, sources=[str(_SOURCE)], extra_cflags=_FLAGS, verbose=False,
                )
            except Exception as e:  # no compiler, no headers, ...: the PyTorch path still works
                _failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"attnres: the fused CPU read did not build, using PyTorch ops ({_failed[:300]})",
                              stacklevel=2)
    return _ext


def unavailable_reason() -> str | None:
    if not _enabled:
        return "turned off (ATTNRES_CPU_KERNEL=0 or set_enabled(False))"
    return _failed


def usable(qp: Tensor, sources: Sequence[Tensor], w: Tensor | None = None) -> bool:
    """Whether the fused kernel can take this read (CPU, one fp32/fp64 dtype, contiguous sources)."""
    if qp.device.type != "cpu" or _failed is not None or not _enabled:
        return False
    dt = qp.dtype
    if dt not in (torch.float32, torch.float64) or (w is not None and (w.device.type != "cpu" or w.dtype != dt)):
        return False
    return all(v.dtype == dt and v.device.type == "cpu" and v.is_contiguous() for v in sources) and load() is not None


class CpuRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qp: Tensor, w: Tensor | None, eps: float, *sources: Tensor):
        ext = load()
        if ext is None:
            raise RuntimeError(f"the fused CPU read is unavailable: {unavailable_reason()}")
        o, s, r, p, rh = ext.read_forward(qp, w, eps, list(sources))
        ctx.save_for_backward(qp, w, s, r, p, rh, *sources)
        return o, p.view(len(sources), *sources[0].shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, dp_out: Tensor | None):
        dqp, dw, grads = backward(ctx, dy, dp_out, first_source=3)
        return dqp, dw, None, *grads


def backward(ctx, dy: Tensor | None, dp_out: Tensor | None, first_source: int):
    """(dqp, dw, source grads) from statistics saved as (qp, w, s, r, p, rh, *sources)."""
    qp, w, s, r, p, rh, *sources = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dy = torch.zeros_like(sources[0]) if dy is None else dy.contiguous()
    dp_out = None if dp_out is None else dp_out.contiguous()
    dq, dw, *grads = _ext.read_backward(
        qp, w, s, r, p, rh if rh is not None else s.new_empty(0), dy, dp_out, list(sources),
        needs[0], needs[1], [bool(needs[first_source + i]) for i in range(len(sources))],
    )
    return (dq if needs[0] else None, dw if needs[1] and w is not None else None,
            [g if needs[first_source + i] else None for i, g in enumerate(grads)])
