"""The fused CPU read (``csrc/read_cpu.cpp``): one pass over the sources per token, forward and backward.

Built with ``torch.utils.cpp_extension.load`` by :func:`prepare` (an AttnRes model calls it when it is
built, so no forward blocks on it; about a minute, once; cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``). ``ATTNRES_CPU_KERNEL=0`` in the environment when attnres is imported
turns it off (:func:`set_enabled` at run time); if the build fails one warning is printed and the
PyTorch implementation, which computes the same function, is used. ``attnres.ops.dispatch`` decides
which reads it takes.

Sources may be fp32, bf16 or fp16, each its own dtype (math in fp32), or all fp64 (math in fp64).

Two entry points to the same C++ functions:
- eager: :class:`CpuRead`, an autograd.Function calling the pybind functions (the least overhead per call);
- ``torch.compile``: the ``torch.library`` ops ``attnres::read_forward`` (autograd registered: its
  backward is ``attnres::read_backward``), ``attnres::read_stacked`` (no-grad, a stacked bank) and the
  two-phase pair ``attnres::phase1`` / ``attnres::merge_forward`` (:func:`phase1`, :func:`merge`), with
  fake kernels, so a compiled graph calls the fused kernel instead of tracing PyTorch ops. The schemas
  are defined here at import, whether or not the kernel builds; the C++ extension adds their CPU
  kernels when it loads. :func:`set_compiled` (default on) lets a compiled model trace the PyTorch ops
  instead, for comparison.

Carried reads (``grads.py``; a Full/Block training forward, :func:`set_carry`): ``read_forward`` and
``merge_forward`` take ``carry`` and return one carrier per source; in backward each source's gradient is
built up in one buffer: eager in place (pybind), compiled through ``attnres::read_backward_into`` (a mutating
op: inductor runs it in place).
"""

from __future__ import annotations

import contextlib
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

from ._checks import source_dtype
from .grads import Needs, Slots, carriers

_SOURCE = Path(__file__).with_name("csrc") / "read_cpu.cpp"
# -fopenmp: at::parallel_for is an inline OpenMP loop, serial unless the extension is built with OpenMP. The
# link names libgomp.so.1, torch's own runtime (same soname, already loaded), so one thread pool serves both.
_OPENMP = platform.system() == "Linux"
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", *(["-fopenmp"] if _OPENMP else [])]
_LDFLAGS = ["-fopenmp"] if _OPENMP else []
_lock = threading.Lock()
_ext = None
_built = False  # _ext is loaded (a bool, for torch.compile's guards)
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
    global _ext, _built, _failed
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
                    name=name, sources=[str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=_LDFLAGS, verbose=False,
                )
                _built = True
            except Exception as e:  # no compiler, no headers, ...: the PyTorch path still works
                _failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"attnres: the fused CPU read did not build, using PyTorch ops ({_failed[:300]})",
                              stacklevel=2)
    return _ext


def unavailable_reason() -> str | None:
    if not _enabled:
        return "turned off (ATTNRES_CPU_KERNEL=0 or set_enabled(False))"
    return _failed


def set_pool_limit(nbytes: int) -> None:
    """Cap the memory the fused kernel keeps for reuse (default 1 GiB; 0 keeps none).

    The read's outputs and source gradients of at least 256 KiB come from a pool of the kernel's own freed
    outputs, so a training step does not pay the page faults of fresh memory for each of them; a buffer
    returns to the pool only when no tensor holds it. Only these tensors use it; PyTorch's allocator is
    untouched. Lower the cap if a process is short of memory; no effect without the kernel."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_pool_limit: nbytes must be an int >= 0 (bytes), got {nbytes!r}")
    ext = load()
    if ext is not None:
        ext.pool_set_limit(nbytes)


@contextlib.contextmanager
def fresh_memory():
    """Within it, the kernel's new outputs take fresh memory instead of the pool (which keeps its buffers):
    to measure what the pool saves."""
    ext = load()
    if ext is not None:
        ext.pool_bypass(True)
    try:
        yield
    finally:
        if ext is not None:
            ext.pool_bypass(False)


def pool_stats() -> dict[str, int]:
    """``{"cached_bytes", "limit_bytes", "hits", "misses"}`` of the output pool (zeros without the kernel)."""
    ext = load()
    if ext is None:
        return dict(cached_bytes=0, limit_bytes=0, hits=0, misses=0)
    return dict(zip(("cached_bytes", "limit_bytes", "hits", "misses"), ext.pool_stats(), strict=True))


_compiled = True  # torch.compile calls the ops (else it traces the PyTorch read)


def set_compiled(flag: bool) -> None:
    """Whether ``torch.compile`` calls the fused kernel (the ``attnres::`` ops; default) or traces the
    PyTorch read for inductor to fuse. Read when a model is compiled (a change recompiles)."""
    global _compiled
    _compiled = bool(flag)


_carry = True  # Full/Block training forwards carry source gradients (grads.py)


def set_carry(flag: bool) -> None:
    """Whether a training forward of a Full/Block model chains its fused reads with carriers (``grads.py``: each
    source's gradient built up in one buffer, in the kernel; default) or lets autograd sum one gradient term per
    read. Same values either way. Read when a model runs (a change recompiles a compiled one)."""
    global _carry
    _carry = bool(flag)


def carry_enabled() -> bool:
    return _carry


_F32_SOURCES = (torch.float32, torch.bfloat16, torch.float16)


def usable(qp: Tensor, sources: Sequence[Tensor], w: Tensor | None = None) -> bool:
    """Whether the fused kernel can take this read: CPU, contiguous sources, a query ``qp`` (and gain
    ``w``) in fp32 with fp32/bf16/fp16 sources (any mix) or in fp64 with fp64 sources. Inside
    ``torch.compile`` only if the kernel is already built (an AttnRes model builds it when it is made)."""
    if qp.device.type != "cpu" or _failed is not None or not _enabled:
        return False
    compiling = torch.compiler.is_compiling()
    if compiling and not (_compiled and _built):
        return False
    dt = qp.dtype
    if w is not None and (w.device.type != "cpu" or w.dtype != dt):
        return False
    if dt == torch.float32:
        ok = all(v.dtype in _F32_SOURCES and v.device.type == "cpu" and v.is_contiguous() for v in sources)
    elif dt == torch.float64:
        ok = all(v.dtype == dt and v.device.type == "cpu" and v.is_contiguous() for v in sources)
    else:
        return False
    return ok and (_built if compiling else load() is not None)


# ---- the torch.library ops: schemas and fake kernels (the CPU kernels come from the extension) ----

torch.library.define(
    "attnres::read_forward",
    "(Tensor qp, Tensor? w, float eps, Tensor[] sources, ScalarType? dtype=None, Tensor[]? carry=None) "
    "-> (Tensor o, Tensor s, Tensor r, Tensor p, Tensor rh, Tensor[] carriers)",
)
torch.library.define("attnres::read_stacked",
                     "(Tensor qp, Tensor? w, float eps, Tensor bank, ScalarType? dtype=None) -> Tensor")
torch.library.define(
    "attnres::read_backward",
    "(Tensor qp, Tensor? w, Tensor s, Tensor r, Tensor p, Tensor rh, Tensor dy, Tensor? dp_out, Tensor[] sources, "
    "bool need_dq, bool need_dw, bool[] need_dv) -> (Tensor dq, Tensor dw, Tensor[] dv)",
)
torch.library.define(  # a carried read's backward: each wanted source's gradient into (or added to) a given buffer
    "attnres::read_backward_into",
    "(Tensor qp, Tensor? w, Tensor s, Tensor r, Tensor p, Tensor rh, Tensor dy, Tensor? dp_out, Tensor[] sources, "
    "bool need_dq, bool need_dw, bool[] need_dv, Tensor(a!)[] grads, bool[] add) -> (Tensor dq, Tensor dw)",
)
torch.library.define(
    "attnres::phase1", "(Tensor qs, float eps, Tensor[] blocks) -> (Tensor s, Tensor r, Tensor o, Tensor m, Tensor l)"
)
torch.library.define(
    "attnres::merge_forward",
    "(Tensor qp, Tensor? w, float eps, Tensor s1, Tensor r1, Tensor o1, Tensor m1, Tensor l1, Tensor[] sources, "
    "ScalarType? dtype=None, Tensor[]? carry=None) -> (Tensor o, Tensor s, Tensor r, Tensor p, Tensor rh, "
    "Tensor[] carriers)",
)
OPS = torch.ops.attnres


@torch.library.register_fake("attnres::read_forward")
def _read_forward_fake(qp, w, eps, sources, dtype=None, carry=None):
    n = sources[0].numel() // qp.shape[0]
    o = torch.empty(sources[0].shape, dtype=dtype or source_dtype(sources), device=qp.device)
    s, r, p = (qp.new_empty(len(sources), n) for _ in range(3))
    return o, s, r, p, qp.new_empty(n if w is not None else 0), list(carriers(sources) if carry is not None else ())


@torch.library.register_fake("attnres::read_stacked")
def _read_stacked_fake(qp, w, eps, bank, dtype=None):
    return bank.new_empty(bank.shape[1:], dtype=dtype or bank.dtype)


@torch.library.register_fake("attnres::read_backward")
def _read_backward_fake(qp, w, s, r, p, rh, dy, dp_out, sources, need_dq, need_dw, need_dv):
    d = qp.shape[0]
    dq = qp.new_empty(d if need_dq else 0)
    dw = qp.new_empty(d if need_dw and w is not None else 0)
    return dq, dw, [torch.empty_like(v, memory_format=torch.contiguous_format)
                    for v, need in zip(sources, need_dv, strict=True) if need]


@torch.library.register_fake("attnres::read_backward_into")
def _read_backward_into_fake(qp, w, s, r, p, rh, dy, dp_out, sources, need_dq, need_dw, need_dv, grads, add):
    d = qp.shape[0]
    return qp.new_empty(d if need_dq else 0), qp.new_empty(d if need_dw and w is not None else 0)


@torch.library.register_fake("attnres::phase1")
def _phase1_fake(qs, eps, blocks):
    k, d = qs.shape
    n = blocks[0].numel() // d
    return qs.new_empty(k, len(blocks), n), qs.new_empty(len(blocks), n), qs.new_empty(k, n, d), \
        qs.new_empty(k, n), qs.new_empty(k, n)


@torch.library.register_fake("attnres::merge_forward")
def _merge_forward_fake(qp, w, eps, s1, r1, o1, m1, l1, sources, dtype=None, carry=None):
    return _read_forward_fake(qp, w, eps, sources, dtype, carry)


_OP_SLOTS = Slots.of_op(OPS.read_forward.default)
_MERGE_SLOTS = Slots.of_op(OPS.merge_forward.default)


def _setup_context(slots: Slots):
    """The read's and the merge's: statistics s, r, rh non-differentiable; the merge's phase-1 statistics (s1 ..
    l1) are constants of the forward schedule, its gradients the joint read's over (qp, w, sources, carry)."""
    def setup_context(ctx, inputs, output):
        args = dict(zip(slots.names, inputs, strict=False))  # defaulted dtype and carry may be absent
        _o, s, r, p, rh, car = output
        ctx.carried = args.get("carry") is not None
        ctx.mark_non_differentiable(s, r, rh, *(_idle(car, args["sources"]) if ctx.carried else ()))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(args["qp"], args["w"], s, r, p, rh, *args["sources"])
    return setup_context


def _op_backward(slots: Slots):
    def op_backward(ctx, do, ds, dr, dp, drh, dcarriers):
        needs = slots.needs(ctx)
        dqp, dw, totals = backward(ctx, do, dp, needs, op=True, acc=dcarriers if ctx.carried else None)
        grads, carry = needs.route(totals)
        return slots.grads(dqp, dw, grads, len(ctx.needs_input_grad), carry if ctx.carried else None)
    return op_backward


torch.library.register_autograd("attnres::read_forward", _op_backward(_OP_SLOTS),
                                setup_context=_setup_context(_OP_SLOTS))
torch.library.register_autograd("attnres::merge_forward", _op_backward(_MERGE_SLOTS),
                                setup_context=_setup_context(_MERGE_SLOTS))


def _phase1_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)  # constants of the forward schedule: the merge's backward is the read's


def _phase1_backward(ctx, *grads):
    return None, None, None


torch.library.register_autograd("attnres::phase1", _phase1_backward, setup_context=_phase1_setup_context)


# ---- the read ----

def read(qp: Tensor, w: Tensor | None, eps: float, sources: Sequence[Tensor],
         dtype: torch.dtype | None = None, carry: Sequence[Tensor] | None = None) -> tuple:
    """``(o, p)`` of the read (as ``attn_res._AttnResRead.apply(qp, w, eps, dtype, *sources)``), fused, ``o``
    in ``dtype`` (default the sources' promoted dtype); the op when compiling, else the autograd.Function.
    With ``carry`` (the carriers of the first ``len(carry)`` sources, ``grads.py``): ``(o, p, carriers)``."""
    qp = qp.contiguous()
    w = None if w is None else w.contiguous()
    if torch.compiler.is_compiling():
        return op_read(qp, w, eps, sources, dtype, carry)
    if carry is None:
        return CpuRead.apply(qp, w, eps, dtype, *sources)
    return _unpack(CpuCarriedRead.apply(qp, w, eps, dtype, len(carry), *sources, *carry))


def _unpack(out: tuple) -> tuple:
    """A carried autograd.Function's (o, p, *carriers) as (o, p, carriers)."""
    return out[0], out[1], tuple(out[2:])


def _op_out(out: tuple, sources: Sequence[Tensor], carry: Sequence[Tensor] | None) -> tuple:
    o, _s, _r, p, _rh, car = out
    p = p.view(len(sources), *sources[0].shape[:-1])
    return (o, p) if carry is None else (o, p, tuple(car))


def op_read(qp: Tensor, w: Tensor | None, eps: float, sources: Sequence[Tensor],
            dtype: torch.dtype | None = None, carry: Sequence[Tensor] | None = None) -> tuple:
    """``(o, p)`` (``(o, p, carriers)`` with ``carry``) of the read through the ``attnres::read_forward`` op
    (any device with a kernel for it)."""
    out = OPS.read_forward(qp, w, float(eps), list(sources), dtype, None if carry is None else list(carry))
    return _op_out(out, sources, carry)


def read_stacked(qp: Tensor, w: Tensor | None, eps: float, bank: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The read's output over the sources stacked in a contiguous ``bank`` [L, ..., D] (no autograd), in
    ``dtype`` (default the bank's); the gain ``w`` may be in any float dtype (used in qp's)."""
    if torch.compiler.is_compiling():
        return OPS.read_stacked(qp, w, float(eps), bank, dtype)
    return _ext.read_forward_stacked(qp, w, eps, bank, dtype)


def phase1(qs: Tensor, eps: float, blocks: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Phase 1 of two-phase Block AttnRes for folded queries ``qs`` [S, D] (no autograd): ``(s [S, n, N],
    r [n, N], o [S, N, D], m [S, N], l [S, N])``, one read of each completed block (``two_phase.phase1``)."""
    if torch.compiler.is_compiling():
        return OPS.phase1(qs, float(eps), list(blocks))
    return _ext.phase1(qs, eps, list(blocks))


def merge(qp: Tensor, w: Tensor | None, eps: float, inter: Sequence[Tensor], sources: Sequence[Tensor],
          dtype: torch.dtype | None = None, carry: Sequence[Tensor] | None = None) -> tuple:
    """``(o, p)`` of the two-phase merged read over ``sources`` (the completed blocks, then the partial sum
    if any) from the phase-1 statistics ``inter = (s, r, o, m, l)`` of this query, ``o`` in ``dtype`` (default
    the sources' promoted dtype); backward is the read's. ``carry``: as :func:`read`."""
    qp = qp.contiguous()
    w = None if w is None else w.contiguous()
    inter = [t.contiguous() for t in inter]
    if torch.compiler.is_compiling():
        return op_merge(qp, w, eps, inter, sources, dtype, carry)
    if carry is None:
        return CpuMerge.apply(qp, w, eps, dtype, *inter, *sources)
    return _unpack(CpuCarriedMerge.apply(qp, w, eps, dtype, len(carry), *inter, *sources, *carry))


def op_merge(qp: Tensor, w: Tensor | None, eps: float, inter: Sequence[Tensor], sources: Sequence[Tensor],
             dtype: torch.dtype | None = None, carry: Sequence[Tensor] | None = None) -> tuple:
    """``(o, p)`` (``(o, p, carriers)`` with ``carry``) of the merged read through ``attnres::merge_forward``."""
    out = OPS.merge_forward(qp, w, float(eps), *inter, list(sources), dtype, None if carry is None else list(carry))
    return _op_out(out, sources, carry)


def _function_forward(ctx, run, qp: Tensor, w: Tensor | None, carried: int | None, tensors: Sequence[Tensor]):
    """The autograd.Functions' forward: ``tensors`` are the sources, then ``carried`` carriers (None: no carry);
    ``run(sources)`` is the kernel's (o, s, r, p, rh)."""
    sources = tensors[:len(tensors) - (carried or 0)]
    o, s, r, p, rh = run(list(sources))
    ctx.set_materialize_grads(False)  # an unused carrier costs nothing in backward
    ctx.carried = carried
    ctx.save_for_backward(qp, w, s, r, p, rh, *sources)
    out = o, p.view(len(sources), *sources[0].shape[:-1])
    if carried is None:
        return out
    car = carriers(sources)
    ctx.mark_non_differentiable(*_idle(car, sources))
    return (*out, *car)


def _idle(car: Sequence[Tensor], sources: Sequence[Tensor]) -> list[Tensor]:
    """The carriers of sources without a gradient: non-differentiable, so no read computes one for them."""
    return [c for c, v in zip(car, sources, strict=True) if not v.requires_grad]


def _function_backward(ctx, slots: Slots, dy: Tensor | None, dp_out: Tensor | None, dcarriers: Sequence) -> tuple:
    needs = slots.needs(ctx, ctx.carried or 0)
    dqp, dw, totals = backward(ctx, dy, dp_out, needs, acc=None if ctx.carried is None else dcarriers)
    grads, carry = needs.route(totals)
    return slots.grads(dqp, dw, grads, carry=carry)


class CpuMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qp: Tensor, w: Tensor | None, eps: float, dtype: torch.dtype | None, s1: Tensor, r1: Tensor,
                o1: Tensor, m1: Tensor, l1: Tensor, *sources: Tensor):
        return CpuCarriedMerge.forward(ctx, qp, w, eps, dtype, None, s1, r1, o1, m1, l1, *sources)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, dp_out: Tensor | None):
        return _function_backward(ctx, _MERGE_FN_SLOTS, dy, dp_out, ())


class CpuCarriedMerge(torch.autograd.Function):
    """:class:`CpuMerge` whose ``sources`` end with ``carried`` carriers (``grads.py``); returns (o, p, *carriers)."""

    @staticmethod
    def forward(ctx, qp: Tensor, w: Tensor | None, eps: float, dtype: torch.dtype | None, carried: int | None,
                s1: Tensor, r1: Tensor, o1: Tensor, m1: Tensor, l1: Tensor, *sources: Tensor):
        return _function_forward(ctx, lambda v: _ext.merge_forward(qp, w, eps, s1, r1, o1, m1, l1, v, dtype),
                                 qp, w, carried, sources)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, dp_out: Tensor | None, *dcarriers: Tensor | None):
        return _function_backward(ctx, _CARRIED_MERGE_FN_SLOTS, dy, dp_out, dcarriers)


class CpuRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qp: Tensor, w: Tensor | None, eps: float, dtype: torch.dtype | None, *sources: Tensor):
        return CpuCarriedRead.forward(ctx, qp, w, eps, dtype, None, *sources)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, dp_out: Tensor | None):
        return _function_backward(ctx, _SLOTS, dy, dp_out, ())


class CpuCarriedRead(torch.autograd.Function):
    """:class:`CpuRead` whose ``sources`` end with ``carried`` carriers (``grads.py``); returns (o, p, *carriers)."""

    @staticmethod
    def forward(ctx, qp: Tensor, w: Tensor | None, eps: float, dtype: torch.dtype | None, carried: int | None,
                *sources: Tensor):
        ext = load()
        if ext is None:
            raise RuntimeError(f"the fused CPU read is unavailable: {unavailable_reason()}")
        return _function_forward(ctx, lambda v: ext.read_forward(qp, w, eps, v, dtype), qp, w, carried, sources)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None, dp_out: Tensor | None, *dcarriers: Tensor | None):
        return _function_backward(ctx, _CARRIED_SLOTS, dy, dp_out, dcarriers)


_SLOTS = Slots.of_function(CpuRead.forward)
_CARRIED_SLOTS = Slots.of_function(CpuCarriedRead.forward)
_MERGE_FN_SLOTS = Slots.of_function(CpuMerge.forward)
_CARRIED_MERGE_FN_SLOTS = Slots.of_function(CpuCarriedMerge.forward)


def _plain(*tensors: Tensor) -> bool:
    return all(type(t) in (Tensor, torch.nn.Parameter) for t in tensors)


def _into(sources: Sequence[Tensor], acc: Sequence[Tensor | None], wanted: Sequence[bool]) -> tuple[list, list]:
    """``attnres::read_backward_into``'s buffers and add flags: each wanted source's gradient so far (contiguous,
    in its dtype), or a new buffer where none came."""
    given, add = [], []
    for v, a, need in zip(sources, acc, wanted, strict=True):
        if need:
            fresh = a is None
            given.append(torch.empty_like(v, memory_format=torch.contiguous_format) if fresh
                         else a.to(v.dtype).contiguous())
            add.append(not fresh)
    return given, add


def backward(ctx, dy: Tensor | None, dp_out: Tensor | None, needs: Needs, op: bool = False,
             acc: Sequence[Tensor | None] | None = None):
    """(dqp, dw, source grads) from statistics saved as (qp, w, s, r, p, rh, *sources); through the
    ``attnres::read_backward`` op when ``op`` or when tracing, else the pybind function. ``acc``: a carried
    read's carrier gradients (one per source, None where none came), which this backward alone holds (the
    engine hands each over once): each source's gradient is added into its own in place (traced: through
    ``attnres::read_backward_into``, which inductor runs in place) and returned. A source's gradient is
    computed where ``needs.wanted()``."""
    qp, w, s, r, p, rh, *sources = ctx.saved_tensors
    if dy is None:  # read in any dtype the kernel takes: zeros of the sources' promoted one
        dy = torch.zeros(sources[0].shape, dtype=source_dtype(sources), device=qp.device)
    dp_out = None if dp_out is None else dp_out.contiguous()
    need_dw = needs.w and w is not None
    rh = s.new_empty(0) if rh is None else rh  # the merged read's forward saves None without a gain
    wanted = needs.wanted()
    acc = [] if acc is None or all(a is None for a in acc) else list(acc)
    args = (qp, w, s, r, p, rh, dy.contiguous(), dp_out, list(sources), needs.qp, need_dw, list(wanted))
    if not (op or torch.compiler.is_compiling() or not _plain(qp, dy, *(a for a in acc if a is not None))):
        dq, dw, given = _ext.read_backward(*args, acc)
    elif acc:  # traced: the op (pybind sees no fakes)
        given, add = _into(sources, acc, wanted)
        dq, dw = OPS.read_backward_into(*args, given, add)
    else:
        dq, dw, given = OPS.read_backward(*args)
    given = iter(given)
    grads = [next(given) if need else None for need in wanted]
    return (dq if needs.qp else None, dw if need_dw else None, grads)
