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
            o, p = fn(q, wo, 1e-6, *src)
        inputs = [q, *(s for s in src if s.requires_grad)] + ([w] if output_norm else [])
        results.append((o, p, *torch.autograd.grad([o, p], inputs, [dy, dpo])))
    for fused, want in ((results[0], results[2]), (results[1], results[2])):
        for a, b in zip(fused, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_read_float32_close_to_float64():
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(64, 300, generator=gen) for _ in range(5)]
    q, w = torch.randn(300, generator=gen) / 17, torch.rand(300, generator=gen) + 0.5
    o, p = cpu_kernel.CpuRead.apply(q, w, 1e-6, *src)
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
    attn_res(q, [s.bfloat16() for s in src])  # bf16: the PyTorch path
    attn_res(q, [s.t().contiguous().t() for s in [torch.randn(8, 8) for _ in range(3)]])  # non-contiguous
    attn_res(q, [src[0], src[1].double(), src[2]])  # mixed dtypes
    assert len(calls) == 1
    cpu_kernel.set_enabled(False)
    try:
        attn_res(q, src)
    finally:
        cpu_kernel.set_enabled(True)
    assert len(calls) == 1


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
            o, _ = cpu_kernel.CpuRead.apply(q, w, 1e-6, *src)
            results.append((o, *torch.autograd.grad(o, [q, w, *src], dy)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


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
