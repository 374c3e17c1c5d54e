"""Two-phase Block AttnRes equals the joint softmax read, forward and every gradient (float64)."""

import pytest
import torch

import attnres.residual.block as block_mod
from attnres import AttnResConfig, AttnResForCausalLM, naive_attn_res
from attnres.ops import two_phase_attn_res

from ..models.test_model import randomize_attnres

pytestmark = pytest.mark.usefixtures("cpu_read_impl")  # fused CPU kernel and PyTorch path

F64 = torch.float64


@pytest.mark.parametrize("n_blocks, s, d, tokens", [(1, 1, 7, (2, 5)), (1, 3, 130, (2, 5)), (4, 2, 33, (2, 5)),
                                                     (9, 4, 1000, (2, 5)), (3, 1, 16, (2, 5)), (1, 2, 1, (1,)),
                                                     (3, 3, 17, (1,)), (2, 1, 5, (1, 1))])  # T = 1, D = 1
@pytest.mark.parametrize("output_norm", [False, True])
def test_two_phase_equals_joint_softmax_forward_and_gradients(n_blocks, s, d, tokens, output_norm):
    g = torch.Generator().manual_seed(n_blocks * 100 + s)
    blocks = [torch.randn(*tokens, d, dtype=F64, generator=g) * (1 + i) for i in range(n_blocks)]
    # read 0 opens the block (no partial); read j >= 1 sees the partial sum so far
    partials = [None] + [torch.randn(*tokens, d, dtype=F64, generator=g) for _ in range(s - 1)]
    q = torch.randn(s, d, dtype=F64, generator=g)
    gain = 1 + 0.1 * torch.randn(s, d, dtype=F64, generator=g)
    og = 1 + 0.1 * torch.randn(d, dtype=F64, generator=g) if output_norm else None
    leaves = [q, gain, *blocks, *partials[1:]] + ([og] if og is not None else [])
    results = []
    for two_phase in (True, False):
        for t in leaves:
            t.requires_grad_(True)
            t.grad = None
        if two_phase:
            outs = two_phase_attn_res(q, blocks, partials, gain, og, rms_eps=1e-6)
        else:
            sources = [[*blocks] + ([p] if p is not None else []) for p in partials]
            outs = [naive_attn_res(q[j], sources[j], rms_weight=gain[j], output_rms_weight=og, rms_eps=1e-6)
                    for j in range(s)]
        loss = sum((o * torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(j))).sum()
                   for j, o in enumerate(outs))
        loss.backward()
        results.append(([o.detach() for o in outs], [t.grad.clone() for t in leaves]))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


TINY = dict(vocab_size=61, hidden_size=24, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, residual="block")


@pytest.mark.parametrize("layers, block_size", [(3, 4), (3, 1), (4, 3), (2, 2), (2, 8)])
def test_block_model_two_phase_equals_joint_read_logits_and_every_gradient(layers, block_size, monkeypatch):
    calls = []
    real = block_mod.phase1
    monkeypatch.setattr(block_mod, "phase1", lambda *a: calls.append(1) or real(*a))
    cfg = AttnResConfig(**TINY, num_hidden_layers=layers, attn_res_block_size=block_size)
    model = AttnResForCausalLM(cfg).double()
    randomize_attnres(model)
    x = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(0))  # 80 tokens: two-phase on
    results = []
    for two_phase in (True, False):
        model.config.attn_res_two_phase = two_phase
        model.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    # phase 1 ran once per layer whose two reads see the same completed blocks
    assert len(calls) == sum((2 * i) // block_size == (2 * i + 1) // block_size for i in range(layers))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-8, atol=1e-11, msg=name)


def test_phase1_ignores_autocast():
    """Under bf16 autocast the phase-1 logits stay in the compute dtype (torch.mm would round them to bf16)."""
    from attnres.ops import phase1

    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g).bfloat16()]
    qs = torch.randn(2, 40, generator=g)
    want = phase1(qs, blocks, 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = phase1(qs, blocks, 1e-6)
    for a, b in zip(got, want, strict=True):
        assert a.s.dtype == torch.float32
        torch.testing.assert_close(a.s, b.s, rtol=0, atol=0)
        torch.testing.assert_close(a.o, b.o, rtol=0, atol=0)


# ---- 16-bit and mixed sources against the float64 reference on the same values ----

BF16, F32 = torch.bfloat16, torch.float32
TOL = {BF16: dict(rtol=2**-7, atol=1e-5), F32: dict(rtol=1e-5, atol=1e-5)}  # as tests/ops/test_cpu_kernel.py
TOL_SUM = dict(rtol=1e-4, atol=1e-4)  # dq, gains: fp32 sums over every token and source


@pytest.mark.parametrize("mode", ["bf16", "mixed"])
@pytest.mark.parametrize("n_blocks, s, d, tokens", [(1, 1, 33, (2, 7)), (1, 3, 17, (1,)), (4, 2, 100, (3, 5)),
                                                     (3, 4, 15, (1, 1))])
@pytest.mark.parametrize("output_norm", [False, True])
def test_two_phase_16bit_against_float64_reference(mode, n_blocks, s, d, tokens, output_norm):
    """bf16 sources (or an fp32 embedding next to bf16 blocks, as under autocast): every read's output and
    the gradients of the queries, gains and every source, against naive_attn_res in float64."""
    g = torch.Generator().manual_seed(n_blocks * 10 + s)
    dts = [BF16] * n_blocks if mode == "bf16" else [F32] + [BF16] * (n_blocks - 1)
    blocks = [(torch.randn(*tokens, d, generator=g) * (1 + i)).to(dt) for i, dt in enumerate(dts)]
    partials = [None] + [torch.randn(*tokens, d, generator=g).to(BF16) for _ in range(s - 1)]
    q = torch.randn(s, d, generator=g) / 3
    gain = 1 + 0.1 * torch.randn(s, d, generator=g)
    og = 1 + 0.1 * torch.randn(d, generator=g) if output_norm else None
    leaves = [q, gain, *blocks, *partials[1:]] + ([og] if output_norm else [])
    for t in leaves:
        t.requires_grad_(True)
    out_dt = BF16 if mode == "bf16" else F32
    dys = [torch.randn(*tokens, d, generator=g).to(out_dt) for _ in range(s)]
    outs = two_phase_attn_res(q, blocks, partials, gain, og, rms_eps=1e-6)
    got = torch.autograd.grad(outs, leaves, dys)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    q64, gain64, b64 = leaves64[0], leaves64[1], leaves64[2:2 + n_blocks]
    p64 = [None] + leaves64[2 + n_blocks:2 + n_blocks + s - 1]
    og64 = leaves64[-1] if output_norm else None
    want = [naive_attn_res(q64[j], [*b64, *([p64[j]] if p64[j] is not None else [])], rms_weight=gain64[j],
                           output_rms_weight=og64, rms_eps=1e-6) for j in range(s)]
    want_grads = torch.autograd.grad(want, leaves64, [dy.double() for dy in dys])
    for o, o64 in zip(outs, want, strict=True):
        assert o.dtype == out_dt
        torch.testing.assert_close(o.double(), o64, **TOL[out_dt])
    for leaf, a, b in zip(leaves, got, want_grads, strict=True):
        assert a.dtype == leaf.dtype
        if leaf is q or leaf is gain or leaf is og:
            torch.testing.assert_close(a.double(), b, **TOL_SUM)
        elif leaf.dtype == BF16 and any(leaf is b for b in blocks):
            # every read's gradient of a block is rounded to bf16 and autograd sums them in bf16, so
            # cancellation between reads leaves errors of the size of the largest term, not of the sum
            assert (a.double() - b).abs().max() <= 2**-7 * b.abs().max(), (a.double() - b).abs().max()
        else:
            torch.testing.assert_close(a.double(), b, **TOL[leaf.dtype])


# ---- phase 1 reads each completed block once, whatever the number of queries ----


def _reads_per_block(blocks, fn):
    """How many ATen ops take (a view of) each block's storage as an input while ``fn`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ptrs = [b.untyped_storage().data_ptr() for b in blocks]
    counts = [0] * len(blocks)
    views = {"view", "_reshape_alias", "t", "transpose", "unsqueeze", "slice", "select", "expand", "detach",
             "alias", "as_strided", "reshape", "_unsafe_view"}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in views:
                seen = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                        if isinstance(a, torch.Tensor)}
                for i, p in enumerate(ptrs):
                    counts[i] += p in seen
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return counts


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_phase1_reads_each_block_a_fixed_number_of_times(dtype, monkeypatch):
    """The PyTorch phase 1 touches each block the same number of times (two sweeps) for S = 1 and S = 4
    (it used to read every block once per query); the fused kernel is one call for all S queries."""
    from attnres.ops import cpu_kernel, phase1

    g = torch.Generator().manual_seed(5)
    blocks = [torch.randn(4, 9, 24, generator=g).to(dtype) for _ in range(3)]
    q = torch.randn(4, 24, generator=g)
    calls = []
    if cpu_kernel.enabled():
        real = cpu_kernel.phase1
        monkeypatch.setattr(cpu_kernel, "phase1", lambda qs, *a: calls.append(qs.shape[0]) or real(qs, *a))
    counts = [_reads_per_block(blocks, lambda k=k: phase1(q[:k], blocks, 1e-6)) for k in (1, 4)]
    if cpu_kernel.enabled():
        assert calls == [1, 4]  # one kernel call per phase 1, all queries at once
    else:
        assert counts[0] == counts[1] and max(counts[0]) <= 3, counts


def test_phase1_kernel_equals_pytorch_phase1_float64():
    from attnres.ops import cpu_kernel
    from attnres.ops.two_phase import _phase1_torch

    if cpu_kernel.load() is None:
        pytest.skip("the fused CPU read is unavailable")
    g = torch.Generator().manual_seed(6)
    blocks = [torch.randn(3, 7, 37, dtype=F64, generator=g) * (1 + i) for i in range(5)]
    qs = torch.randn(3, 37, dtype=F64, generator=g)
    got, want = cpu_kernel.phase1(qs, 1e-6, blocks), _phase1_torch(qs, blocks, 1e-6)
    for name, a, b in zip("sroml", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


# ---- the ops attnres::phase1 / attnres::merge_forward ----

OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("dtypes", [[F64, F64], [F32, BF16], [BF16, BF16]])
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("output_norm", [False, True])
def test_opcheck_phase1_and_merge_forward(dtypes, partial, output_norm):
    from attnres.ops import cpu_kernel

    if cpu_kernel.load() is None:
        pytest.skip("the fused CPU read is unavailable")
    g = torch.Generator().manual_seed(7)
    ct = F64 if dtypes[0] == F64 else F32
    blocks = [torch.randn(2, 5, 19, generator=g).to(dt).requires_grad_() for dt in dtypes]
    qs = torch.randn(2, 19, generator=g).to(ct)
    torch.library.opcheck(cpu_kernel.OPS.phase1.default, (qs, 1e-6, blocks), test_utils=OPCHECK)
    s, r, o, m, l = cpu_kernel.OPS.phase1(qs, 1e-6, blocks)
    sources = [*blocks] + ([torch.randn(2, 5, 19, generator=g).to(dtypes[-1]).requires_grad_()] if partial else [])
    qp = qs[1].clone().requires_grad_()
    w = (1 + 0.1 * torch.randn(19, generator=g)).to(ct).requires_grad_() if output_norm else None
    args = (qp, w, 1e-6, s[1], r, o[1], m[1], l[1], sources)
    torch.library.opcheck(cpu_kernel.OPS.merge_forward.default, args, test_utils=OPCHECK)
    # the op's output and registered gradients are the joint read's
    out, _s, _r, p, _rh, _c = cpu_kernel.OPS.merge_forward(*args)
    want, pw = cpu_kernel.OPS.read_forward(qp, w, 1e-6, sources)[::3]
    leaves = [qp, *sources] + ([w] if output_norm else [])
    dy = torch.randn(out.shape, generator=g).to(out.dtype)
    ga, gb = (torch.autograd.grad([x, pp], leaves, [dy, torch.ones_like(pp)]) for x, pp in ((out, p), (want, pw)))
    tol = dict(rtol=1e-12, atol=1e-12) if ct == F64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want, **tol)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_compiled_two_phase_calls_the_ops_and_matches_eager(cpu_read_impl):
    """fullgraph compile (aot_eager): phase 1 and each merge are attnres:: ops in the forward graph, each
    merge's backward the read's backward op; the same numbers as eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = []

    def keep(gm, _):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm.forward)

    g = torch.Generator().manual_seed(8)
    blocks = [torch.randn(2, 6, 24, dtype=F64, generator=g, requires_grad=True) for _ in range(3)]
    partials = [None, torch.randn(2, 6, 24, dtype=F64, generator=g, requires_grad=True)]
    q = torch.randn(2, 24, dtype=F64, generator=g, requires_grad=True)
    og = torch.rand(24, dtype=F64, generator=g) + 0.5

    def fn(q, *src):
        return sum(o.square().sum() for o in two_phase_attn_res(q, src[:3], [None, src[3]], output_rms_weight=og))

    leaves = [q, *blocks, partials[1]]
    cf = torch.compile(fn, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    got = torch.autograd.grad(cf(*leaves), leaves)
    want = torch.autograd.grad(fn(*leaves), leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    fw, bw = graphs
    if cpu_read_impl == "torch":  # the kernel off: PyTorch ops traced
        assert not [t for t in fw + bw if t.startswith("attnres.")]
        return
    assert fw.count("attnres.phase1.default") == 1 and fw.count("attnres.merge_forward.default") == 2
    assert "attnres.read_forward.default" not in fw and bw.count("attnres.read_backward.default") == 2


# ---- the Triton merge (CUDA; on the CPU under TRITON_INTERPRET=1) ----

INTERPRET = __import__("os").environ.get("TRITON_INTERPRET") == "1"


def _triton_merge_case(dtypes, partial, output_norm, d, tokens=(2, 5), seed=0, triton_phase1=False):
    """triton_merge's (o, p) and the gradients of q', w and every source, against naive_attn_res in
    float64 on the same values; phase 1 from PyTorch ops (its o is a row-strided [N, D] view) or Triton."""
    from attnres.ops import triton_read as tr
    from attnres.ops.two_phase import InterBlock, _phase1_torch

    dev = "cpu" if INTERPRET else "cuda"
    g = torch.Generator().manual_seed(seed)
    n = len(dtypes) - partial
    ct = F64 if all(dt == F64 for dt in dtypes) else F32
    src = [(torch.randn(*tokens, d, generator=g, dtype=F64) * (1 + i)).to(dev, dt) for i, dt in enumerate(dtypes)]
    qs = (torch.randn(2, d, generator=g, dtype=F64) * 2 / d**0.5).to(dev, ct)
    w = (1 + 0.2 * torch.randn(d, generator=g, dtype=F64)).to(dev, ct) if output_norm else None
    s, r, o, m, l = tr.triton_phase1(qs, 1e-6, src[:n]) if triton_phase1 else _phase1_torch(qs, src[:n], 1e-6)
    inter = InterBlock(s[1], r, o[1], m[1], l[1])
    leaves = [qs[1].clone().requires_grad_(), *(v.clone().requires_grad_() for v in src)]
    leaves += [w.clone().requires_grad_()] if output_norm else []
    got_o, got_p = tr.triton_merge(leaves[0], leaves[-1] if output_norm else None, 1e-6, inter.tensors(),
                                   leaves[1:1 + len(src)])
    ref = [t.detach().double().requires_grad_() for t in leaves]
    want_o, want_p = naive_attn_res(ref[0], ref[1:1 + len(src)], output_rms_weight=ref[-1] if output_norm else None,
                                    rms_eps=1e-6, return_weights=True)
    dy = torch.randn(got_o.shape, generator=g, dtype=F64).to(dev, got_o.dtype)
    dp = torch.randn(got_p.shape, generator=g, dtype=F64).to(dev)
    got = torch.autograd.grad([got_o, got_p], leaves, [dy, dp.to(got_p.dtype)])
    want = torch.autograd.grad([want_o, want_p], ref, [dy.double(), dp])
    assert got_o.dtype == want_o.dtype if ct == F64 else True
    if ct == F64:
        tol = dict(rtol=1e-10, atol=1e-12)
        pairs = [(got_o, want_o, tol), (got_p, want_p, tol)] + [(a, b, tol) for a, b in zip(got, want, strict=True)]
    else:
        out_tol = TOL[got_o.dtype] if got_o.dtype in TOL else TOL[F32]
        pairs = [(got_o, want_o, out_tol), (got_p, want_p, TOL[F32])]
        pairs += [(a, b, TOL_SUM if x is leaves[0] or (output_norm and x is leaves[-1]) else TOL[x.dtype])
                  for a, b, x in zip(got, want, leaves, strict=True)]
    for a, b, tol in pairs:
        torch.testing.assert_close(a.double().cpu(), b.detach().cpu(), **tol)


def _triton_or_skip(cpu_read_impl):
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or INTERPRET):
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    if cpu_read_impl == "torch":
        pytest.skip("the Triton merge does not depend on the CPU kernel: run once")


@pytest.mark.parametrize("n_blocks, d, tokens", [(1, 7, (2, 5)), (4, 33, (3, 5)), (3, 1, (1,)), (2, 130, (1, 1))])
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("output_norm", [False, True])
def test_triton_merge_float64_against_reference(n_blocks, d, tokens, partial, output_norm, cpu_read_impl):
    _triton_or_skip(cpu_read_impl)
    _triton_merge_case([F64] * (n_blocks + partial), partial, output_norm, d, tokens, seed=n_blocks * 10 + d)


@pytest.mark.parametrize("output_norm", [False, True])
def test_triton_merge_d_chunked(output_norm, cpu_read_impl, monkeypatch):
    _triton_or_skip(cpu_read_impl)
    from attnres.ops import triton_read as tr

    monkeypatch.setattr(tr, "BLOCK_D_MAX", 16)  # D = 37: three chunks, the last partial
    _triton_merge_case([F64] * 4, True, output_norm, 37, (3, 4), seed=3)


@pytest.mark.parametrize("dtypes", [[BF16] * 3, [F32, BF16, BF16]])
@pytest.mark.parametrize("output_norm", [False, True])
def test_triton_merge_16bit_and_mixed(dtypes, output_norm, cpu_read_impl):
    _triton_or_skip(cpu_read_impl)
    _triton_merge_case(dtypes, True, output_norm, 40, (2, 7), seed=4)


@pytest.mark.parametrize("n_blocks, s, d, tokens", [(1, 1, 7, (2, 5)), (4, 3, 33, (3, 5)), (3, 2, 1, (1,)),
                                                     (2, 4, 130, (1, 1))])
@pytest.mark.parametrize("chunked", [False, True])
def test_triton_phase1_equals_pytorch_phase1_float64(n_blocks, s, d, tokens, chunked, cpu_read_impl, monkeypatch):
    _triton_or_skip(cpu_read_impl)
    from attnres.ops import triton_read as tr
    from attnres.ops.two_phase import _phase1_torch

    if chunked:
        monkeypatch.setattr(tr, "BLOCK_D_MAX", 16)  # the two-sweep form (a no-op for D <= 16)
    dev = "cpu" if INTERPRET else "cuda"
    g = torch.Generator().manual_seed(n_blocks * 10 + s)
    blocks = [(torch.randn(*tokens, d, dtype=F64, generator=g) * (1 + i)).to(dev) for i in range(n_blocks)]
    qs = (torch.randn(s, d, dtype=F64, generator=g) * 2 / d**0.5).to(dev)
    got, want = tr.triton_phase1(qs, 1e-6, blocks), _phase1_torch(qs, blocks, 1e-6)
    for name, a, b in zip("sroml", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtypes", [[BF16] * 3, [F32, BF16, BF16]])
@pytest.mark.parametrize("chunked", [False, True])
def test_triton_phase1_and_merge_16bit_and_mixed(dtypes, chunked, cpu_read_impl, monkeypatch):
    _triton_or_skip(cpu_read_impl)
    from attnres.ops import triton_read as tr

    if chunked:
        monkeypatch.setattr(tr, "BLOCK_D_MAX", 16)
    _triton_merge_case(dtypes, True, True, 40, (2, 7), seed=5, triton_phase1=True)
    _triton_merge_case([F64] * 4, False, False, 33, (3,), seed=6, triton_phase1=True)
