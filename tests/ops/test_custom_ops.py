"""The fused CPU read as torch.library ops (attnres::read_forward / read_backward / read_stacked):
opcheck (schema, fake kernels, autograd registration), gradients through the op against the reference,
and torch.compile calling them."""

import pytest
import torch

from attnres import naive_attn_res
from attnres.ops import cpu_kernel

from .test_cpu_kernel import check_16bit_read

pytestmark = pytest.mark.skipif(cpu_kernel.load() is None, reason="the fused CPU read is unavailable")

OPS = cpu_kernel.OPS
F64 = torch.float64
TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _inputs(dtypes, shape, output_norm, grad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    ct = F64 if dtypes[0] == F64 else torch.float32
    src = [torch.randn(shape, generator=gen).to(dt).requires_grad_(grad) for dt in dtypes]
    q = (torch.randn(d, generator=gen) / 3).to(ct).requires_grad_(grad)
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to(ct).requires_grad_(grad) if output_norm else None
    return q, w, src


@pytest.mark.parametrize("dtypes", [[F64] * 3, [torch.float32], [torch.bfloat16] * 2,
                                    [torch.float32, torch.bfloat16, torch.float16]])
@pytest.mark.parametrize("output_norm", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_read_forward(dtypes, output_norm, grad):
    q, w, src = _inputs(dtypes, (2, 5, 19), output_norm, grad)
    torch.library.opcheck(OPS.read_forward.default, (q, w, 1e-6, src), test_utils=TESTS)


@pytest.mark.parametrize("need", [(True, True, (True, False, True)), (False, False, (False, False, True))])
def test_opcheck_read_backward_and_stacked(need):
    q, w, src = _inputs([torch.float32, torch.bfloat16, torch.bfloat16], (3, 17), True, False)
    _o, s, r, p, rh, _c = OPS.read_forward(q, w, 1e-6, src)
    dy = torch.randn(3, 17)
    dpo = torch.randn(3, 3)
    args = (q, w, s, r, p, rh, dy, dpo, src, *need[:2], list(need[2]))
    torch.library.opcheck(OPS.read_backward.default, args, test_utils=TESTS)
    # a carried read's: each wanted source's gradient into a given buffer, added to its contents where asked
    dq, dw, plain = OPS.read_backward(*args)
    wanted = [v for v, need_dv in zip(src, need[2], strict=True) if need_dv]
    add = [i % 2 == 0 for i in range(len(wanted))]
    start = [torch.randn(v.shape).to(v.dtype) for v in wanted]
    grads = [t.clone() for t in start]
    torch.library.opcheck(OPS.read_backward_into.default, (*args, [t.clone() for t in start], add), test_utils=TESTS)
    got = OPS.read_backward_into(*args, grads, add)
    assert torch.equal(got[0], dq) and torch.equal(got[1], dw)
    for g, g0, a, want in zip(grads, start, add, plain, strict=True):
        torch.testing.assert_close(g.float(), want.float() + (g0.float() if a else 0), rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="gradient buffers for"):
        OPS.read_backward_into(*args, [*grads, grads[0]], [*add, False])
    with pytest.raises(RuntimeError, match="must be a contiguous CPU tensor of its dtype"):
        OPS.read_backward_into(*args, [g.double() for g in grads], add)
    bank = torch.randn(4, 2, 3, 17)
    torch.library.opcheck(OPS.read_stacked.default, (q, w, 1e-6, bank), test_utils=TESTS)
    want = naive_attn_res(q.double(), bank.double(), output_rms_weight=w.double())
    torch.testing.assert_close(OPS.read_stacked(q, w, 1e-6, bank).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("output_norm", [False, True])
def test_read_and_merge_write_the_output_dtype_asked_for(out, output_norm):
    """``dtype=``: the output rounded once from the fp32 result, bit for bit ``o.to(dtype)`` of the default read
    (the eager pybind path and the op), the gradient read in that dtype giving bit for bit the gradients of the
    same values upcast; the PyTorch read does the same; opcheck with the argument."""
    from attnres.ops.attn_res import _AttnResRead

    q, w, src = _inputs([torch.float32, torch.bfloat16, torch.bfloat16], (3, 17), output_norm, True)
    o32, *_ = OPS.read_forward(q, w, 1e-6, src)
    leaves = [q, *src] + ([w] if output_norm else [])
    dy = torch.randn(3, 17).to(out)
    want = torch.autograd.grad(o32, leaves, dy.float())
    for o in (OPS.read_forward(q, w, 1e-6, src, out)[0], cpu_kernel.CpuRead.apply(q, w, 1e-6, out, *src)[0]):
        assert o.dtype == out and torch.equal(o, o32.to(out))
        for a, b in zip(torch.autograd.grad(o, leaves, dy), want, strict=True):
            assert torch.equal(a, b)
    o = _AttnResRead.apply(q, w, 1e-6, out, *src)[0]
    assert o.dtype == out
    torch.testing.assert_close(o.float(), o32.to(out).float(), rtol=2**-7, atol=1e-5)
    torch.library.opcheck(OPS.read_forward.default, (q, w, 1e-6, src, out), test_utils=TESTS)
    qs = torch.stack([q.detach(), torch.randn(17)])
    s1, r1, o1, m1, l1 = OPS.phase1(qs, 1e-6, src[:2])
    args = (q, w, 1e-6, s1[0], r1, o1[0], m1[0], l1[0], src)
    merged = OPS.merge_forward(*args)[0]
    assert torch.equal(OPS.merge_forward(*args, out)[0], merged.to(out))
    assert torch.equal(cpu_kernel.CpuMerge.apply(q, w, 1e-6, out, *args[3:8], *src)[0], merged.to(out))
    torch.library.opcheck(OPS.merge_forward.default, (*args, out), test_utils=TESTS)


def test_read_output_dtype_errors():
    q, w, src = _inputs([torch.float32, torch.bfloat16], (3, 17), True, False)
    with pytest.raises(RuntimeError, match="output dtype Int is not allowed with a Float qp"):
        OPS.read_forward(q, w, 1e-6, src, torch.int32)
    with pytest.raises(RuntimeError, match="output dtype Double is not allowed with a Float qp"):
        OPS.read_forward(q, w, 1e-6, src, F64)


@pytest.mark.parametrize("gain", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_read_stacked_takes_the_gain_and_writes_the_output_in_other_dtypes(gain, dtype):
    """Cached decode of a 16-bit model: a norm gain of any float dtype is used in fp32 and the output written in
    the activation dtype, bit for bit what casting around the fp32 read gives; opcheck with the dtype argument."""
    q, w, _src = _inputs([torch.float32], (3, 17), True, False)
    w = w.to(gain)
    bank = torch.randn(5, 2, 3, 17)
    want = OPS.read_stacked(q, w.float(), 1e-6, bank)
    want = want if dtype is None else want.to(dtype)
    for got in (OPS.read_stacked(q, w, 1e-6, bank, dtype), cpu_kernel.read_stacked(q, w, 1e-6, bank, dtype)):
        assert got.dtype == (dtype or torch.float32) and got.shape == (2, 3, 17)
        assert torch.equal(got, want)
    torch.library.opcheck(OPS.read_stacked.default, (q, w, 1e-6, bank, dtype), test_utils=TESTS)
    ref = naive_attn_res(q.double(), bank.double(), output_rms_weight=w.double())
    torch.testing.assert_close(OPS.read_stacked(q, w, 1e-6, bank).double(), ref, rtol=1e-5, atol=1e-5)


def test_read_stacked_rejects_an_output_dtype_it_cannot_write():
    q, w, _src = _inputs([torch.float32], (3, 17), True, False)
    bank = torch.randn(2, 3, 17)
    with pytest.raises(RuntimeError, match="output dtype Double is not allowed with a Float qp"):
        OPS.read_stacked(q, w, 1e-6, bank, torch.float64)
    with pytest.raises(RuntimeError, match="output dtype BFloat16 is not allowed with a Double qp"):
        OPS.read_stacked(q.double(), w.double(), 1e-6, bank.double(), torch.bfloat16)
    with pytest.raises(RuntimeError, match="bank must be a contiguous CPU"):
        OPS.read_stacked(q, w, 1e-6, bank.transpose(0, 1))
    with pytest.raises(RuntimeError, match="w must be floating point, got Int"):
        OPS.read_stacked(q, w.int(), 1e-6, bank)


@pytest.mark.parametrize("output_norm", [False, True])
def test_op_gradients_equal_reference_float64(output_norm):
    """The op's registered autograd: forward and every gradient (a source without one in the middle)."""
    q, w, src = _inputs([F64] * 4, (2, 7, 33), output_norm, True, seed=1)
    src[1].requires_grad_(False)
    dy, dpo = torch.randn(2, 7, 33, dtype=F64), torch.randn(4, 2, 7, dtype=F64)
    leaves = [q, src[0], src[2], src[3]] + ([w] if output_norm else [])
    o, _s, _r, p, _rh, _c = OPS.read_forward(q, w, 1e-6, src)
    got = torch.autograd.grad([o, p.view(4, 2, 7)], leaves, [dy, dpo])
    o2, p2 = naive_attn_res(q, src, output_rms_weight=w, return_weights=True)
    want = torch.autograd.grad([o2, p2], leaves, [dy, dpo])
    torch.testing.assert_close(o, o2, rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["bf16", "mixed"])
def test_op_gradients_16bit_against_float64_reference(mode):
    def read(q, w, eps, src):
        o, _s, _r, p, _rh, _c = OPS.read_forward(q, w, eps, src)
        return o, p.view(len(src), *src[0].shape[:-1])

    check_16bit_read(read, mode, 5, (2, 9, 40), True, seed=5)


@pytest.mark.parametrize("output_norm", [False, True])
def test_compiled_read_calls_the_op_and_matches_eager(output_norm):
    """fullgraph compile of the public read (aot_eager: forward and backward graphs, no codegen)."""
    from attnres import attn_res

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(g, _):
            graphs.append([str(n.target) for n in g.graph.nodes if n.op == "call_function"])
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    q, w, src = _inputs([F64] * 3, (2, 6, 24), output_norm, True, seed=2)
    fn = torch.compile(lambda q, w, *s: attn_res(q, s, output_rms_weight=w), backend=backend, fullgraph=True)
    got = fn(q, w, *src)
    ggot = torch.autograd.grad(got.square().sum(), [q, *src])
    want = attn_res(q, src, output_rms_weight=w)
    gwant = torch.autograd.grad(want.square().sum(), [q, *src])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(ggot, gwant, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert ["attnres.read_forward.default" in g for g in graphs] == [True, False]
    assert ["attnres.read_backward.default" in g for g in graphs] == [False, True]


def _chain(read, queries, sources, partials=None):
    """A Full-like run of carried reads: read i over sources[: i + 1] (+ partials[i] if given, not carried), each
    taking the carriers of the previous read's leading sources; the last read's carriers are left unused."""
    outs, carry = [], ()
    for i, q in enumerate(queries):
        srcs = (*sources[: i + 1], *([partials[i]] if partials is not None else []))
        o, p, carriers = read(q, srcs, carry)
        outs += [o, p]
        carry = carriers[: i + 1]
    return outs


def _merge_read(q, w, srcs, carry, op):
    from attnres.ops import phase1

    inter = phase1(q[None], srcs[:-1], 1e-6)[0].tensors()
    fn = cpu_kernel.op_merge if op else cpu_kernel.merge
    return fn(q, w, 1e-6, inter, srcs, None, carry)


@pytest.mark.parametrize("path", ["function", "op", "merge_function", "merge_op"])
@pytest.mark.parametrize("output_norm", [False, True])
def test_carried_reads_equal_the_reference_float64(path, output_norm):
    """Carried reads (grads.py): every source's gradient built up through the carriers equals the plain reads'
    sum over the reference, forward and every gradient; a source without a gradient, awkward shapes, a partial
    sum that is not carried (Block), an unused output and the last read's unused carriers."""
    gen = torch.Generator().manual_seed(3)
    shape, n = (3, 5, 37), 4
    sources = [torch.randn(shape, dtype=F64, generator=gen, requires_grad=i != 2) for i in range(n)]
    partials = [torch.randn(shape, dtype=F64, generator=gen, requires_grad=True) for _ in range(n)]
    queries = [(torch.randn(37, dtype=F64, generator=gen) / 4).requires_grad_() for _ in range(n)]
    w = (1 + 0.1 * torch.randn(37, dtype=F64, generator=gen)).requires_grad_() if output_norm else None
    merge, op = path.startswith("merge"), path.endswith("op")
    if merge:
        got = _chain(lambda q, srcs, carry: _merge_read(q, w, srcs, carry, op), queries, sources, partials)
    else:
        fn = cpu_kernel.op_read if op else cpu_kernel.read
        got = _chain(lambda q, srcs, carry: fn(q, w, 1e-6, srcs, None, carry), queries, sources)
    want = _chain(lambda q, srcs, carry: (*naive_attn_res(q, srcs, output_rms_weight=w, return_weights=True), ()),
                  queries, sources, partials if merge else None)
    cots = [torch.randn(t.shape, dtype=F64, generator=gen) for t in want]
    cots[2] = None  # the second read's output is unused
    leaves = [*queries, *(s for s in sources if s.requires_grad), *(partials if merge else []),
              *([w] if output_norm else [])]

    def grads(outs):
        used = [(o, c) for o, c in zip(outs, cots, strict=True) if c is not None]
        return torch.autograd.grad([o for o, _ in used], leaves, [c for _, c in used])

    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads(got), grads(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("output_norm", [False, True])
def test_opcheck_carried_read_and_merge(output_norm):
    q, w, src = _inputs([torch.float32, torch.bfloat16, torch.bfloat16], (2, 3, 19), output_norm, True, seed=4)
    carry = list(cpu_kernel.carriers(src[:2]))
    torch.library.opcheck(OPS.read_forward.default, (q, w, 1e-6, src, None, carry), test_utils=TESTS)
    out = OPS.read_forward(q, w, 1e-6, src, None, carry)
    assert [(c.shape, c.dtype, c.stride()) for c in out[5]] == [(v.shape, v.dtype, (0, 0, 0)) for v in src]
    assert OPS.read_forward(q, w, 1e-6, src)[5] == []
    from attnres.ops import phase1

    inter = phase1(q.detach()[None], src[:2], 1e-6)[0].tensors()
    torch.library.opcheck(OPS.merge_forward.default, (q, w, 1e-6, *inter, src, None, carry), test_utils=TESTS)


def test_compiled_carried_reads_build_each_gradient_in_one_buffer():
    """Fullgraph-compiled carried reads (inductor): the last read's backward (its carriers unused) makes the
    source gradients with ``read_backward``, every earlier read adds into them in place with
    ``read_backward_into`` (no copy, nothing else sums them); values and gradients equal eager."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    sources = [torch.randn(2, 9, 40, generator=gen, requires_grad=True) for _ in range(4)]
    queries = [(torch.randn(40, generator=gen) / 4).requires_grad_() for _ in range(4)]
    leaves = [*queries, *sources]

    def run(*tensors):
        outs = _chain(lambda q, s, c: cpu_kernel.read(q, None, 1e-6, s, None, c), tensors[:4], tensors[4:])
        return sum((o.square().sum() for o in outs[::2]), torch.zeros(()))

    compiled = torch.compile(run, fullgraph=True)
    (loss, got), codes = run_and_get_code(lambda: (lambda out: (out, torch.autograd.grad(out, leaves)))(
        compiled(*leaves)))
    eager = run(*leaves)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, torch.autograd.grad(eager, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    (backward,) = [c for c in codes if "read_backward" in c]
    calls = [ln for ln in backward.splitlines() if "= torch.ops.attnres.read_backward" in ln]
    assert len(calls) == 4 and sum("read_backward_into" in ln for ln in calls) == 3
    assert "clone" not in backward and "copy_" not in backward
