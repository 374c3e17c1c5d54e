"""The AttnRes read: its defining properties, and the production op held to the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnres import attn_res, naive_attn_res

pytestmark = pytest.mark.usefixtures("cpu_read_impl")  # fused CPU kernel and PyTorch path

OPS = [attn_res, naive_attn_res]
F64 = torch.float64


def _sources(n, *shape, dtype=F64):
    return [torch.randn(*shape, dtype=dtype) for _ in range(n)]


@pytest.mark.parametrize("op", OPS)
def test_zero_query_gives_the_mean_of_the_sources(op):
    src = _sources(5, 3, 4, 16)
    o = op(torch.zeros(16, dtype=F64), src)
    torch.testing.assert_close(o, torch.stack(src).mean(0))


@pytest.mark.parametrize("op", OPS)
def test_scaled_query_aligned_with_one_key_selects_that_source(op):
    src = _sources(6, 2, 64)
    target = 3
    key = src[target] / src[target].pow(2).mean(-1, keepdim=True).sqrt()
    for b in range(2):  # the query is static: align it with one token's key
        o, p = op(40.0 * key[b] / key[b].norm(), [s[b] for s in src], return_weights=True)
        assert p[target] > 0.99
        torch.testing.assert_close(o, src[target][b], atol=0.05, rtol=0)


@pytest.mark.parametrize("op", OPS)
def test_sources_of_very_different_magnitudes_are_weighed_by_direction(op):
    d = 32
    u, w = torch.zeros(d, dtype=F64), torch.zeros(d, dtype=F64)
    u[:16], w[16:] = 1.0, 1.0
    q = 5.0 * u
    _, p_small_selected = op(q, [u, 1e4 * w], return_weights=True)
    _, p_big = op(q, [1e4 * u, w], return_weights=True)
    assert p_small_selected[0] > 0.99  # the tiny source wins on direction alone
    torch.testing.assert_close(p_small_selected, p_big, atol=1e-6, rtol=0)  # magnitude changes nothing


@pytest.mark.parametrize("op", OPS)
def test_softmax_runs_over_sources_per_token(op):
    src = _sources(4, 2, 5, 8)
    q = torch.randn(8, dtype=F64)
    _, p = op(q, src, return_weights=True)
    assert p.shape == (4, 2, 5)
    torch.testing.assert_close(p.sum(0), torch.ones(2, 5, dtype=F64))
    # changing one token's sources changes that token's weights only
    src[1][1, 3] += 10
    _, p2 = op(q, src, return_weights=True)
    changed = (p2 - p).abs().amax(0) > 1e-12
    assert changed[1, 3] and changed.sum() == 1


def test_reference_has_no_temperature_and_uses_raw_values():
    # one hand-computed case: D=2, two tokens-free sources
    v0 = torch.tensor([3.0, 4.0], dtype=F64)
    v1 = torch.tensor([-1.0, 0.0], dtype=F64)
    q = torch.tensor([1.0, 2.0], dtype=F64)
    k0 = v0 / (v0.pow(2).mean() + 1e-6).sqrt()
    k1 = v1 / (v1.pow(2).mean() + 1e-6).sqrt()
    s = torch.stack([q @ k0, q @ k1])
    p = torch.softmax(s, 0)
    o, pw = naive_attn_res(q, [v0, v1], return_weights=True)
    torch.testing.assert_close(pw, p)
    torch.testing.assert_close(o, p[0] * v0 + p[1] * v1)


def _inputs(n, d, stacked, with_gains, tokens=(2, 3)):
    src = [torch.randn(*tokens, d, dtype=F64) * (1 + i) for i in range(n)]
    q = torch.randn(d, dtype=F64) * 0.5
    g = 1 + 0.1 * torch.randn(d, dtype=F64) if with_gains else None
    og = 1 + 0.1 * torch.randn(d, dtype=F64) if with_gains else None
    residuals = torch.stack(src) if stacked else src
    return q, residuals, g, og


@pytest.mark.parametrize("n", [1, 2, 9, 33])
@pytest.mark.parametrize("d", [7, 130, 1000])
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("output_norm", [False, True])
def test_attn_res_equals_reference_forward_and_every_gradient_in_float64(n, d, stacked, output_norm):
    q, res, g, og = _inputs(n, d, stacked, with_gains=True)
    og = og if output_norm else None
    leaves = [q, g, *(res if isinstance(res, list) else [res])] + ([og] if og is not None else [])
    outs, grads = [], []
    for op in (attn_res, naive_attn_res):
        for t in leaves:
            t.requires_grad_(True)
            t.grad = None
        o, p = op(q, res, rms_weight=g, output_rms_weight=og, rms_eps=1e-6, scale=0.7, return_weights=True)
        upstream = torch.randn_like(o, generator=torch.Generator().manual_seed(1))
        (o * upstream).sum().add((p * p).sum()).backward()
        outs.append((o.detach(), p.detach()))
        grads.append([t.grad.clone() for t in leaves])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("n", [1, 2, 9])
@pytest.mark.parametrize("output_norm", [False, True])
def test_attn_res_passes_gradcheck(n, output_norm):
    q, res, g, og = _inputs(n, 7, stacked=False, with_gains=True, tokens=(3,))
    og = og if output_norm else None
    extra = [og] if og is not None else []

    def f(q, g, *rest):
        src, out_g = (list(rest[:-1]), rest[-1]) if output_norm else (list(rest), None)
        o, p = attn_res(q, src, rms_weight=g, output_rms_weight=out_g, return_weights=True)
        return o, p

    args = [t.requires_grad_(True) for t in [q, g, *res, *extra]]
    assert torch.autograd.gradcheck(f, args)


def test_bf16_in_gives_bf16_out_close_to_fp32():
    src = _sources(5, 4, 130, dtype=torch.float32)
    q = torch.randn(130) * 0.3
    ref = attn_res(q, src)
    o, p = attn_res(q, [s.bfloat16() for s in src], return_weights=True)
    assert o.dtype == torch.bfloat16 and p.dtype == torch.float32
    torch.testing.assert_close(o.float(), ref, atol=0.05, rtol=0.02)
    assert naive_attn_res(q, [s.bfloat16() for s in src]).dtype == torch.bfloat16


@pytest.mark.parametrize("op", OPS)
def test_mixed_dtypes_promote_like_the_residual_sum(op):
    # under bf16 autocast the embedding stays fp32 while sublayer outputs are bf16
    src = [torch.randn(4, 24)] + [torch.randn(4, 24).bfloat16().requires_grad_() for _ in range(3)]
    src[0].requires_grad_()
    q = torch.randn(24) * 0.3
    o = op(q, src)
    assert o.dtype == torch.float32
    torch.testing.assert_close(o, naive_attn_res(q, [s.detach().float() for s in src]), rtol=1e-6, atol=1e-6)
    o.sum().backward()
    assert [s.grad.dtype for s in src] == [torch.float32] + [torch.bfloat16] * 3


@pytest.mark.parametrize("shape", [(16,), (1, 16), (16, 1)])
def test_query_shapes_are_equivalent(shape):
    src = _sources(3, 5, 16)
    q = torch.randn(16, dtype=F64)
    torch.testing.assert_close(attn_res(q.reshape(shape), src), attn_res(q, src))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(query=torch.zeros(4), residuals=[]), ValueError, "empty"),
        (dict(query=torch.zeros(4), residuals=torch.zeros(0, 2, 4)), ValueError, "L=0"),
        (dict(query=torch.zeros(4), residuals=[torch.zeros(2, 4), torch.zeros(2, 5)]), ValueError, "(2, 5)"),
        (dict(query=torch.zeros(5), residuals=[torch.zeros(2, 4)]), ValueError, "D=4"),
        (dict(query=torch.zeros(2, 4), residuals=[torch.zeros(2, 4)]), ValueError, "(2, 4)"),
        (dict(query=torch.zeros(4), residuals=[torch.zeros(2, 4)], rms_weight=torch.ones(3)), ValueError, "rms_weight"),
        (dict(query=torch.zeros(4), residuals=[torch.zeros(2, 4)], output_rms_weight=torch.ones(5)), ValueError,
         "output_rms_weight"),
        (dict(query=torch.zeros(4), residuals="abc"), TypeError, "str"),
        (dict(query=torch.zeros(4), residuals=[torch.zeros(2, 4), 3]), TypeError, "residuals[1]"),
        (dict(query=torch.zeros(4), residuals=[torch.zeros(2, 4, dtype=torch.long)]), TypeError, "int64"),
        (dict(query=torch.zeros(4), residuals=[torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.int32)]), TypeError,
         "int32"),
        (dict(query=[0.0] * 4, residuals=[torch.zeros(2, 4)]), TypeError, "list"),
        (dict(query=torch.zeros(4), residuals=[torch.zeros(2, 4)], rms_eps=-1.0), ValueError, "-1.0"),
        (dict(query=torch.zeros(0), residuals=[torch.zeros(3, 0)] * 2), ValueError, "(3, 0)"),
    ],
)
def test_bad_input_raises_naming_the_value(op, kwargs, exc, words):
    with pytest.raises(exc) as info:
        op(**kwargs)
    assert words in str(info.value)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12), d=st.integers(1, 40), tokens=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    scale=st.floats(0.1, 3.0), eps=st.sampled_from([0.0, 1e-6, 1e-2]), seed=st.integers(0, 2**16),
)
def test_attn_res_equals_reference_on_random_shapes(n, d, tokens, scale, eps, seed):
    g = torch.Generator().manual_seed(seed)
    src = [torch.randn(*tokens, d, dtype=F64, generator=g) + 0.1 for _ in range(n)]
    q = torch.randn(d, dtype=F64, generator=g)
    w = torch.rand(d, dtype=F64, generator=g) + 0.5
    a = attn_res(q, src, rms_weight=w, output_rms_weight=w, rms_eps=eps, scale=scale, return_weights=True)
    b = naive_attn_res(q, src, rms_weight=w, output_rms_weight=w, rms_eps=eps, scale=scale, return_weights=True)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
