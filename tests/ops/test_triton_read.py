"""The Triton read held to the reference: values, depth weights and every gradient, on awkward shapes.

Runs on a GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1); skipped otherwise.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRET), reason="needs a CUDA GPU or TRITON_INTERPRET=1"
)

from attnres.ops import triton_read as tr  # noqa: E402
from attnres.ops.reference import naive_attn_res  # noqa: E402

# the interpreter reads the pointer table as host addresses: CPU tensors only
DEV = "cpu" if INTERPRET else "cuda"
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
EPS = 1e-6
# max |error| / max |expected| per result dtype: rounding plus margin (fp64 runs at ~1e-15, fp32 at ~1e-6;
# bf16/fp16 results may differ from the oracle's by one step of the format, 2^-7 / 2^-10 near the maximum)
TOL = {F64: 1e-10, F32: 1e-4, F16: 5e-3, BF16: 2e-2}


def _inputs(n, shape, dtypes, with_w, seed=0):
    """n sources of `shape` (dtypes cycled, magnitudes spread), folded query and output gain in the compute dtype."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    src = [(torch.randn(*shape, generator=g) * (0.5 + i % 4)).to(DEV, dtypes[i % len(dtypes)]) for i in range(n)]
    ct = F64 if all(v.dtype == F64 for v in src) else F32
    qp = (torch.randn(d, generator=g, dtype=F64) * 3 / d**0.5).to(DEV, ct)  # logits of spread ~3
    w = (1 + 0.2 * torch.randn(d, generator=g, dtype=F64)).to(DEV, ct) if with_w else None
    return src, qp, w


def _leaves(src, qp, w):
    return (
        [t.detach().clone().requires_grad_() for t in src],
        qp.detach().clone().requires_grad_(),
        (None if w is None else w.detach().clone().requires_grad_()),
    )


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _close(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert _rel(a, b) <= TOL[b.dtype], f"{what}: {_rel(a, b):.2e}"


def _compare(src, qp, w, use_o=True, use_p=True, seed=1):
    """Forward o and p, then the gradients of qp, w and every source, against the reference."""
    s1, q1, w1 = _leaves(src, qp, w)
    s2, q2, w2 = _leaves(src, qp, w)
    o1, p1 = tr.triton_read(q1, w1, EPS, s1)
    o2, p2 = naive_attn_res(q2, s2, output_rms_weight=w2, rms_eps=EPS, return_weights=True)
    _close(o1, o2, "o")
    _close(p1, p2, "p")
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o1.shape, generator=g, dtype=F64).to(DEV, o1.dtype)
    gp = torch.randn(p1.shape, generator=g, dtype=F64).to(DEV, p1.dtype)
    outs = [(o1, o2, go)] * use_o + [(p1, p2, gp)] * use_p
    ins1 = [q1] + ([w1] if w is not None else []) + s1
    ins2 = [q2] + ([w2] if w is not None else []) + s2
    grads1 = torch.autograd.grad([t[0] for t in outs], ins1, [t[2] for t in outs], allow_unused=True)
    grads2 = torch.autograd.grad([t[1] for t in outs], ins2, [t[2] for t in outs], allow_unused=True)
    for k, (a, b, x) in enumerate(zip(grads1, grads2, ins2, strict=True)):
        a = torch.zeros_like(x) if a is None else a  # w gets no gradient through p alone
        b = torch.zeros_like(x) if b is None else b
        _close(a, b, f"grad {k}")


# fp64 sources: the kernel computes in fp64, so it must agree with the oracle to rounding
@pytest.mark.parametrize(
    "n, shape, with_w",
    [
        (1, (5, 7), True),
        (2, (3, 4, 130), False),
        (9, (2, 5, 1000), True),
        (9, (13, 130), False),
        (33, (7, 130), True),
        (33, (3, 7), False),
        (65, (3, 7), True),
    ],
)
def test_fp64_matches_reference(n, shape, with_w):
    _compare(*_inputs(n, shape, [F64], with_w))


@pytest.mark.parametrize("use_o, use_p", [(True, False), (False, True)])
@pytest.mark.parametrize("with_w", [False, True])
def test_fp64_gradient_through_one_output(use_o, use_p, with_w):
    _compare(*_inputs(4, (6, 33), [F64], with_w), use_o=use_o, use_p=use_p)


@pytest.mark.parametrize("d", [130, 1000])
@pytest.mark.parametrize("with_w", [False, True])
def test_fp64_d_chunked(monkeypatch, d, with_w):
    monkeypatch.setattr(tr, "BLOCK_D_MAX", 64)  # forces the D-chunk loops
    _compare(*_inputs(9, (2, 3, d), [F64], with_w))


@pytest.mark.parametrize("with_w", [False, True])
def test_d_wider_than_the_register_tile(with_w):
    d = tr.BLOCK_D_MAX + 4
    _compare(*_inputs(2, (3, d), [F32], with_w))


@pytest.mark.parametrize("with_w", [False, True])
def test_fp32(with_w):
    _compare(*_inputs(9, (2, 5, 130), [F32], with_w))


@pytest.mark.parametrize("with_w", [False, True])
def test_bf16(with_w):
    _compare(*_inputs(9, (3, 5, 130), [BF16], with_w))


@pytest.mark.parametrize("d", [7, 130])
def test_mixed_fp32_bf16(d):
    src, qp, w = _inputs(5, (2, 3, d), [F32, BF16], True)
    assert src[0].dtype == F32 and src[1].dtype == BF16
    _compare(src, qp, w)  # o is fp32; the bf16 sources' gradients are bf16


def test_mixed_dtypes_chunked(monkeypatch):
    monkeypatch.setattr(tr, "BLOCK_D_MAX", 32)
    _compare(*_inputs(6, (5, 70), [F32, BF16, F16], True))


def test_mixed_fp32_bf16_values_in_fp32():
    # the same read with every source upcast to fp32 (exactly) must give the same o and p
    src, qp, w = _inputs(7, (4, 130), [BF16, F32], True)
    o1, p1 = tr.triton_read(qp, w, EPS, src)
    o2, p2 = tr.triton_read(qp, w, EPS, [v.float() for v in src])
    assert o1.dtype == F32
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-7)


def test_strided_and_transposed_sources():
    src, qp, w = _inputs(2, (3, 5, 2 * 130), [F64], True)
    qp, w = qp[:130], w[:130]

    def views(a, b):  # two row-strided slices (read in place), a transposed and a column-strided view (copied)
        return [a[..., :130], a[..., 130:], b[..., :130].transpose(0, 1).contiguous().transpose(0, 1), b[..., ::2]]

    (a1, b1), (a2, b2) = [[v.detach().clone().requires_grad_() for v in src] for _ in range(2)]
    v1, v2 = views(a1, b1), views(a2, b2)
    assert not any(v.is_contiguous() for v in v1)
    o1, p1 = tr.triton_read(qp, w, EPS, v1)
    o2, p2 = naive_attn_res(qp, v2, output_rms_weight=w, rms_eps=EPS, return_weights=True)
    assert _rel(o1, o2) <= 1e-10 and _rel(p1, p2) <= 1e-10
    go, gp = torch.randn_like(o1), torch.randn_like(p1)
    torch.autograd.backward([o1, p1], [go, gp])
    torch.autograd.backward([o2, p2], [go, gp])
    assert _rel(a1.grad, a2.grad) <= 1e-10 and _rel(b1.grad, b2.grad) <= 1e-10


def test_sources_without_gradient():
    src, qp, w = _inputs(3, (4, 33), [F64], True)
    s1, q1, w1 = _leaves(src, qp, w)
    s1[0].requires_grad_(False)
    o, p = tr.triton_read(q1, w1, EPS, s1)
    (o.sum() + p[1].sum()).backward()
    assert s1[0].grad is None and s1[1].grad is not None
    s2, q2, w2 = _leaves(src, qp, w)
    o2, p2 = naive_attn_res(q2, s2, output_rms_weight=w2, rms_eps=EPS, return_weights=True)
    (o2.sum() + p2[1].sum()).backward()
    for a, b in [(q1, q2), (w1, w2), (s1[1], s2[1]), (s1[2], s2[2])]:
        assert _rel(a.grad, b.grad) <= 1e-10


def test_a_wrong_eps_is_detected():
    # the comparison is not vacuous: a wrong eps moves o and p far beyond the fp64 tolerance
    src, qp, w = _inputs(3, (4, 7), [F64], True)
    src = [v * 1e-3 for v in src]
    o1, p1 = tr.triton_read(qp, w, 1e-3, src)
    o2, p2 = naive_attn_res(qp, src, output_rms_weight=w, rms_eps=EPS, return_weights=True)
    assert _rel(p1, p2) > 1e-3 and _rel(o1, o2) > 1e-3


@pytest.mark.parametrize("with_w", [False, True])
@pytest.mark.parametrize("d", [7, 130])
def test_op_kernels_equal_the_cpu_ops_float64(monkeypatch, with_w, d):
    """The CUDA kernels registered for the attnres:: ops (what torch.compile calls after set_compiled(True)),
    called as functions, return what the CPU ops return: every output of read_forward, read_backward,
    read_stacked, phase1 and merge_forward, in float64 (D chunked when 130); carriers from the forwards when
    asked for."""
    from attnres.ops import cpu_kernel

    if not INTERPRET or cpu_kernel.load() is None:
        pytest.skip("compares against the CPU kernel, under the interpreter")
    for name in tr.OP_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
    monkeypatch.setattr(tr, "BLOCK_D_MAX", 64)
    ops, k = torch.ops.attnres, tr.OP_KERNELS
    src, qp, w = _inputs(5, (3, 4, d), [F64], with_w)
    fwd = k["attnres::read_forward"](qp, w, EPS, src)
    want = ops.read_forward(qp, w, EPS, src)
    for name, a, b in zip("osrp", fwd, want, strict=False):
        _close(a, b, name)
    if with_w:
        _close(fwd[4], want[4], "rh")
    else:
        assert fwd[4].numel() == 0 and want[4].numel() == 0
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(src[0].shape, generator=g, dtype=F64)
    dp = torch.randn(5, 12, generator=g, dtype=F64)
    need = [True, False, True, True, False]
    got = k["attnres::read_backward"](qp, w, *fwd[1:5], dy, dp, src, True, with_w, need)
    want = ops.read_backward(qp, w, *want[1:5], dy, dp, src, True, with_w, need)
    _close(got[0], want[0], "dq")
    assert got[1].shape == want[1].shape and (not with_w or _rel(got[1], want[1]) <= TOL[F64])
    assert len(got[2]) == len(want[2]) == 3
    for i, (a, b) in enumerate(zip(got[2], want[2], strict=True)):
        _close(a, b, f"dv {i}")
    carriers = k["attnres::read_forward"](qp, w, EPS, src, None, [])[5]
    assert [c.shape for c in carriers] == [v.shape for v in src] and not any(c.any() for c in carriers)
    _close(k["attnres::read_stacked"](qp, w, EPS, torch.stack(src)), ops.read_stacked(qp, w, EPS, torch.stack(src)),
           "stacked")
    if with_w:  # a float32 gain and output with the float64 bank: both cast like the CPU op's callers would
        got = k["attnres::read_stacked"](qp, w.float(), EPS, torch.stack(src), torch.float32)
        _close(got, ops.read_stacked(qp, w.float().double(), EPS, torch.stack(src)).float(), "stacked fp32")
    qs = torch.randn(2, d, generator=g, dtype=F64) / d**0.5
    inter = k["attnres::phase1"](qs, EPS, src[:4])
    for name, a, b in zip(("s", "r", "o", "m", "l"), inter, ops.phase1(qs, EPS, src[:4]), strict=True):
        _close(a, b, f"phase1 {name}")
    stats = (inter[0][1], inter[1], inter[2][1], inter[3][1], inter[4][1])  # the second query's terms
    got = k["attnres::merge_forward"](qs[1], w, EPS, *stats, src, None, src[:2])
    want = ops.merge_forward(qs[1], w, EPS, *stats, src, None, src[:2])
    for name, a, b in zip("osrp", got, want, strict=False):
        _close(a, b, f"merge {name}")
    assert len(got[5]) == len(want[5]) == len(src)


@pytest.mark.parametrize("out", [BF16, F16])
def test_triton_read_and_merge_write_the_output_dtype_asked_for(out):
    """``dtype=``: the Triton read and merge round their output once into it, as ``o.to(dtype)`` of the default
    output (within one step of the format: Triton's interpreter truncates where torch rounds to nearest), and read
    a gradient in it, giving the gradients of the same values upcast."""
    src, qp, w = _inputs(3, (2, 5, 40), [F32, BF16], True)
    src, qp, w = _leaves(src, qp, w)
    o32 = tr.triton_read(qp, w, EPS, src)[0]
    o = tr.triton_read(qp, w, EPS, src, out)[0]
    assert o.dtype == out
    _close(o, o32.to(out), "read")
    dy = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(DEV, out)
    leaves = [qp, w, *src]
    for a, b in zip(torch.autograd.grad(o, leaves, dy), torch.autograd.grad(o32, leaves, dy.float()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    inter = tr.triton_phase1(torch.stack([qp.detach(), qp.detach() * 0.5]), EPS, src[:2])
    stats = (inter[0][0], inter[1], inter[2][0], inter[3][0], inter[4][0])
    merged = tr.triton_merge(qp, w, EPS, stats, src)[0]
    _close(tr.triton_merge(qp, w, EPS, stats, src, out)[0], merged.to(out), "merge")
