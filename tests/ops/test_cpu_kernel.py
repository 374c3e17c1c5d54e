"""The fused CPU read (csrc/read_cpu.cpp) against the reference, and when the op dispatches to it."""

import pytest
import torch

from attnres import attn_res, naive_attn_res
from attnres.ops import cpu_kernel
from attnres.ops.attn_res import _AttnResRead

F64 = torch.float64

pytestmark = pytest.mark.skipif(cpu_kernel.load() is None, reason="the fused CPU read is unavailable")


@pytest.mark.parametrize("d", [1, 7, 15, 16, 17, 31, 32, 33, 100])  # the vector blocks (8 doubles) and tails
@pytest.mark.parametrize("n", [1, 3, 9])
@pytest.mark.parametrize("output_norm", [False, True])
def test_fused_read_equals_reference_forward_and_gradients_float64(d, n, output_norm):
    gen = torch.Generator().manual_seed(d * 100 + n)
    src = [torch.randn(2, 19, d, dtype=F64, generator=gen, requires_grad=i != 1) for i in range(n)]
    q = torch.randn(d, dtype=F64, generator=gen, requires_grad=True)
    w = (1 + 0.1 * torch.randn(d, dtype=F64, generator=gen)).requires_grad_(output_norm)
    wo = w if output_norm else None
    dy = torch.randn(2, 19, d, dtype=F64, generator=gen)
    dpo = torch.randn(n, 2, 19, dtype=F64, generator=gen)
    results = []
    for fn in (cpu_kernel.CpuRead.apply, _AttnResRead.apply, None):
        if fn is None:
            o, p = naive_attn_res(q, src, output_rms_weight=wo, rms_eps=1e-6, return_weights=True)
        else:
            o, p = fn(q, wo, 1e-6, None, *src)
        inputs = [q, *(s for s in src if s.requires_grad)] + ([w] if output_norm else [])
        results.append((o, p, *torch.autograd.grad([o, p], inputs, [dy, dpo])))
    for fused, want in ((results[0], results[2]), (results[1], results[2])):
        for a, b in zip(fused, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_read_float32_close_to_float64():
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(64, 300, generator=gen) for _ in range(5)]
    q, w = torch.randn(300, generator=gen) / 17, torch.rand(300, generator=gen) + 0.5
    o, p = cpu_kernel.CpuRead.apply(q, w, 1e-6, None, *src)
    o64, p64 = naive_attn_res(q.double(), [s.double() for s in src], output_rms_weight=w.double(), return_weights=True)
    torch.testing.assert_close(o.double(), o64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.double(), p64, rtol=1e-5, atol=1e-6)


def test_dispatch(monkeypatch):
    calls = []
    real = cpu_kernel.CpuRead.apply
    monkeypatch.setattr(cpu_kernel.CpuRead, "apply", lambda *a: calls.append(1) or real(*a))
    src = [torch.randn(4, 8) for _ in range(3)]
    q = torch.randn(8)
    attn_res(q, src)
    assert len(calls) == 1  # fp32, contiguous, CPU
    attn_res(q, [s.bfloat16() for s in src])  # bf16: fused, fp32 math
    attn_res(q, [s.half() for s in src])  # fp16
    attn_res(q, [src[0], src[1].bfloat16(), src[2].half()])  # fp32 embedding + 16-bit outputs, read in place
    assert len(calls) == 4
    attn_res(q, [s.t().contiguous().t() for s in [torch.randn(8, 8) for _ in range(3)]])  # non-contiguous
    attn_res(q, [src[0], src[1].double(), src[2]])  # fp32 + fp64: fp64 math, the PyTorch path
    assert len(calls) == 4
    cpu_kernel.set_enabled(False)
    try:
        attn_res(q, src)
    finally:
        cpu_kernel.set_enabled(True)
    assert len(calls) == 4


def test_fused_read_is_the_same_with_several_threads():
    gen = torch.Generator().manual_seed(1)
    src = [torch.randn(3, 70, 40, dtype=F64, generator=gen, requires_grad=True) for _ in range(4)]
    q = torch.randn(40, dtype=F64, generator=gen, requires_grad=True)
    w = torch.rand(40, dtype=F64, generator=gen).add_(0.5).requires_grad_()
    dy = torch.randn(3, 70, 40, dtype=F64, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):  # per-thread partial sums of the query and gain gradients
            torch.set_num_threads(n)
            o, _ = cpu_kernel.CpuRead.apply(q, w, 1e-6, None, *src)
            results.append((o, *torch.autograd.grad(o, [q, w, *src], dy)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not cpu_kernel._OPENMP, reason="built without OpenMP off Linux")
def test_kernel_runs_on_torch_threads():
    """at::parallel_for is inline OpenMP: built without -fopenmp it runs every loop on one thread."""
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert cpu_kernel.load().parallel_width(64) == n
    finally:
        torch.set_num_threads(threads)


def test_merged_read_accepts_non_contiguous_query_and_gain():
    from attnres.ops import two_phase_attn_res

    gen = torch.Generator().manual_seed(2)
    blocks = [torch.randn(5, 12, dtype=F64, generator=gen, requires_grad=True) for _ in range(3)]
    partials = [None, torch.randn(5, 12, dtype=F64, generator=gen, requires_grad=True)]
    q = torch.randn(12, 2, dtype=F64, generator=gen).t().requires_grad_()  # non-contiguous [2, 12]
    og = torch.rand(12, 2, dtype=F64, generator=gen)[:, 0]  # non-contiguous [12]
    outs = two_phase_attn_res(q, blocks, partials, output_rms_weight=og)
    sum(o.sum() for o in outs).backward()
    want = [naive_attn_res(q[j], [*blocks, *([partials[j]] if partials[j] is not None else [])],
                           output_rms_weight=og) for j in range(2)]
    for o, w in zip(outs, want, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-10, atol=1e-12)
    assert q.grad is not None and all(b.grad is not None for b in blocks)


def test_gain_on_another_device_or_dtype_takes_the_pytorch_path():
    q, src = torch.randn(8), [torch.randn(3, 8) for _ in range(2)]
    assert cpu_kernel.usable(q, src) and not cpu_kernel.usable(q, src, torch.ones(8, dtype=F64))
    assert not cpu_kernel.usable(q, src, torch.ones(8, device="meta"))


# ---- 16-bit and mixed sources: fp32 math inside, outputs in the sources' (promoted) dtype ----

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# |kernel - float64 reference on the same 16-bit values|: a 16-bit result carries one rounding
# (half an ulp: 2^-9 relative for bf16, 2^-12 for fp16) on top of fp32 math; fp32 results only the math.
TOL = {BF16: dict(rtol=2**-7, atol=1e-5), F16: dict(rtol=2**-10, atol=1e-5), F32: dict(rtol=1e-5, atol=1e-5)}
TOL_SUM = dict(rtol=1e-4, atol=1e-4)  # dq', dw: fp32 sums over every token and source


def _sources(mode, n, shape, gen):
    """n sources of ``shape``: all bf16, all fp16, or an fp32 embedding then bf16 (as under autocast)."""
    dts = {"bf16": [BF16] * n, "f16": [F16] * n, "mixed": [F32] + [BF16] * (n - 1)}[mode]
    return [(torch.randn(shape, generator=gen) * (1 + i)).to(dt) for i, dt in enumerate(dts)]


def check_16bit_read(read, mode, n, shape, output_norm, seed=0):
    """``read(q, w, eps, sources) -> (o, p)`` against naive_attn_res in float64 on the same values:
    forward, p, and the gradient of every input (one source without one)."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    src = _sources(mode, n, shape, gen)
    q = (torch.randn(d, generator=gen) / 3).requires_grad_()
    w = (1 + 0.1 * torch.randn(d, generator=gen)).requires_grad_(output_norm)
    wo = w if output_norm else None
    for i, s in enumerate(src):
        s.requires_grad_(i != 1 or n == 1)
    out_dt = src[0].dtype if mode != "mixed" else F32
    dy = torch.randn(shape, generator=gen).to(out_dt)
    dpo = torch.randn(n, *shape[:-1], generator=gen)
    o, p = read(q, wo, 1e-6, src)
    assert o.dtype == out_dt and p.dtype == F32 and o.shape == shape
    leaves = [q, *(s for s in src if s.requires_grad)] + ([w] if output_norm else [])
    got = torch.autograd.grad([o, p], leaves, [dy, dpo])

    src64 = [s.detach().double().requires_grad_(s.requires_grad) for s in src]
    q64, w64 = q.detach().double().requires_grad_(), w.detach().double().requires_grad_(output_norm)
    o64, p64 = naive_attn_res(q64, src64, output_rms_weight=w64 if output_norm else None, rms_eps=1e-6,
                              return_weights=True)
    leaves64 = [q64, *(s for s in src64 if s.requires_grad)] + ([w64] if output_norm else [])
    want = torch.autograd.grad([o64, p64], leaves64, [dy.double(), dpo.double()])
    torch.testing.assert_close(o.double(), o64, **TOL[out_dt])
    torch.testing.assert_close(p.double(), p64, **TOL[F32])
    for leaf, g, g64 in zip(leaves, got, want, strict=True):
        assert g.dtype == leaf.dtype
        tol = TOL_SUM if leaf is q or leaf is w else TOL[leaf.dtype]
        torch.testing.assert_close(g.double(), g64, **tol)


@pytest.mark.parametrize("mode", ["bf16", "f16", "mixed"])
@pytest.mark.parametrize("d", [1, 15, 33, 100])  # tails of the 16-float vectors, and one full block + tail
@pytest.mark.parametrize("n, shape", [(1, (1, 1)), (2, (2, 19)), (9, (3, 5)), (9, (1,))])  # T = 1 twice
@pytest.mark.parametrize("output_norm", [False, True])
def test_fused_read_16bit_and_mixed_sources_against_float64_reference(mode, d, n, shape, output_norm):
    check_16bit_read(lambda q, w, eps, s: cpu_kernel.CpuRead.apply(q, w, eps, None, *s), mode, n, (*shape, d),
                     output_norm, seed=d * 10 + n)


def test_fused_read_16bit_no_grad_and_public_op(monkeypatch):
    """Without autograd (prefill/decode) the same kernel runs; attn_res dispatches 16-bit reads to it."""
    calls = []
    real = cpu_kernel.CpuRead.apply
    monkeypatch.setattr(cpu_kernel.CpuRead, "apply", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(3)
    src = _sources("mixed", 4, (2, 7, 40), gen)
    q, g, w = torch.randn(40, generator=gen), torch.rand(40, generator=gen) + 0.5, torch.rand(40, generator=gen) + 0.5
    with torch.no_grad():
        o = attn_res(q, src, rms_weight=g, output_rms_weight=w, scale=0.7)
    want = naive_attn_res(q.double(), [s.double() for s in src], rms_weight=g.double(), output_rms_weight=w.double(),
                          scale=0.7)
    assert calls == [1] and o.dtype == F32
    torch.testing.assert_close(o.double(), want, **TOL[F32])
    for dt in (BF16, F16):
        with torch.no_grad():
            o = attn_res(q, [s.to(dt) for s in src], output_rms_weight=w)
        want = naive_attn_res(q.double(), [s.to(dt).double() for s in src], output_rms_weight=w.double())
        assert o.dtype == dt
        torch.testing.assert_close(o.double(), want, **TOL[dt])
    assert len(calls) == 3


def test_fused_read_bf16_rounds_like_torch():
    """The output's fp32 -> bf16 rounding is round-to-nearest-even, as ``Tensor.to(torch.bfloat16)``
    (the fp32 result of a single source with p = 1 is the source itself: compare a rounded gain)."""
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(3, 64, generator=gen).bfloat16()
    w = torch.randn(64, generator=gen) * 3  # y = v * rstd(v) * w, rounded once to bf16
    o, _ = cpu_kernel.CpuRead.apply(torch.zeros(64), w, 1e-6, None, v)
    vf = v.float()
    want = (vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + 1e-6) * w).bfloat16()
    assert (o.float() - want.float()).abs().max() <= (want.float().abs() * 2**-8).max()
    assert (o == want).float().mean() > 0.99  # ties of fp32-rounding apart, bit-equal


@pytest.mark.parametrize("scale", [1.0, 1e-38, 1e-40])
def test_fused_read_bf16_output_bit_equal_to_torch_rounding(scale):
    """Writing bf16 in the kernel (one instruction where the CPU has AVX512-BF16) rounds every value, subnormal
    ones included (which that instruction would flush to zero), exactly as ``Tensor.to(torch.bfloat16)`` rounds
    the kernel's fp32 result; zeros keep their sign."""
    gen = torch.Generator().manual_seed(6)
    bank = torch.randn(3, 5, 48, generator=gen) * scale
    bank[0, 0, :16] = 0.0
    bank[:, 1, 16:32] = -0.0
    q = torch.randn(48, generator=gen) / 4
    want = cpu_kernel.read_stacked(q, None, 1e-6, bank).to(BF16)
    got = cpu_kernel.read_stacked(q, None, 1e-6, bank, BF16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    if scale < 1e-37:
        assert (want.float().abs() < torch.finfo(torch.float32).tiny).logical_and(want != 0).any()  # subnormals


@pytest.mark.parametrize("mode", ["bf16", "f16", "mixed"])
@pytest.mark.parametrize("n, shape", [(1, (1, 1, 33)), (2, (2, 19, 17)), (9, (3, 5, 100))])
@pytest.mark.parametrize("output_norm", [False, True])
def test_merged_read_fused_backward_16bit_and_mixed(mode, n, shape, output_norm, monkeypatch):
    """Block's two-phase read (fused phase 1, merge forward and backward) on 16-bit and mixed sources."""
    from attnres.ops import merged_read, phase1

    calls = []
    real = cpu_kernel.backward
    monkeypatch.setattr(cpu_kernel, "backward", lambda *a, **k: calls.append(1) or real(*a, **k))

    def read(q, w, eps, src):
        blocks, partial = (src[:-1], src[-1]) if len(src) > 1 else (src, None)
        inter = phase1(q[None], blocks, eps)[0]
        return merged_read(q, inter, blocks, partial, w, eps)

    check_16bit_read(read, mode, n, shape, output_norm, seed=n)
    assert calls == [1]


def test_two_phase_kernels_are_the_same_with_several_threads():
    """phase1 and merge_forward work per token row: bit-equal outputs and source gradients at 1 and 3
    threads (the query's gradient sums per-thread partials, so only to rounding)."""
    from attnres.ops import two_phase_attn_res

    gen = torch.Generator().manual_seed(9)
    blocks = [torch.randn(3, 70, 40, generator=gen, requires_grad=True) for _ in range(3)]
    partials = [None, torch.randn(3, 70, 40, generator=gen).bfloat16().requires_grad_()]
    q = torch.randn(2, 40, generator=gen, requires_grad=True)
    og = torch.rand(40, generator=gen) + 0.5
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            outs = two_phase_attn_res(q, blocks, partials, output_rms_weight=og)
            leaves = [q, *blocks, partials[1]]
            results.append((*outs, *torch.autograd.grad(sum(o.float().square().sum() for o in outs), leaves)))
    finally:
        torch.set_num_threads(threads)
    (*same_a, dq_a), (*same_b, dq_b) = [(*r[:2], *r[3:], r[2]) for r in results]
    for a, b in zip(same_a, same_b, strict=True):
        assert torch.equal(a, b)
    # fp32 partial sums in another order: to rounding of the largest term
    torch.testing.assert_close(dq_a, dq_b, rtol=1e-5, atol=1e-6 * dq_a.abs().max().item())


@pytest.fixture
def pool_limit():
    yield cpu_kernel.set_pool_limit
    cpu_kernel.set_pool_limit(1 << 30)


def test_pool_reuses_freed_outputs_and_never_one_still_held(pool_limit):
    """Outputs of >= 256 KiB come from the pool once freed, never while a tensor holds them; the limit caps
    what is kept (0 frees everything) and bad limits are refused."""
    pool_limit(1 << 30)
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(256, 512, generator=gen) for _ in range(3)]  # outputs of 512 KiB
    q = torch.randn(512, generator=gen) / 20
    want = naive_attn_res(q.double(), [s.double() for s in src])
    held = cpu_kernel.CpuRead.apply(q, None, 1e-6, None, *src)[0]
    before = cpu_kernel.pool_stats()
    for _ in range(3):
        o = cpu_kernel.CpuRead.apply(q, None, 1e-6, None, *src)[0]
        assert o.data_ptr() != held.data_ptr()
        torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)
        del o
    after = cpu_kernel.pool_stats()
    assert after["hits"] - before["hits"] >= 2  # the second and third output reuse the first one's buffer
    torch.testing.assert_close(held.double(), want, rtol=1e-5, atol=1e-5)
    assert 0 < after["cached_bytes"] <= 1 << 30
    pool_limit(0)
    assert cpu_kernel.pool_stats()["cached_bytes"] == 0
    o = cpu_kernel.CpuRead.apply(q, None, 1e-6, None, *src)[0]
    del o
    assert cpu_kernel.pool_stats()["cached_bytes"] == 0
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="nbytes must be an int >= 0"):
            pool_limit(bad)


def test_pooled_source_gradients_accumulate_correctly(pool_limit):
    """Source gradients from pooled buffers, summed by autograd over several reads of the same sources
    (as the layers of a model read them), equal the reference's, also when the buffers are recycled."""
    gen = torch.Generator().manual_seed(1)
    src = [torch.randn(128, 600, dtype=F64, generator=gen, requires_grad=True) for _ in range(3)]
    qs = [torch.randn(600, dtype=F64, generator=gen) / 25 for _ in range(3)]
    grads = []
    for fn in (lambda q, vs: cpu_kernel.CpuRead.apply(q, None, 1e-6, None, *vs)[0], naive_attn_res):
        for _ in range(2):  # the second pass runs on recycled buffers
            h = [fn(q, src[: i + 1]) for i, q in enumerate(qs)]
            grads.append(torch.autograd.grad(sum((x * x).sum() for x in h), src))
    for a, b in zip(grads[1], grads[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
