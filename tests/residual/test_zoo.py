"""The comparison schemes (ZOO.md) and the Table 4 ablations at the scheme level: each against a float64
statement written plainly from ZOO.md (forward and every gradient, off the init), its step-0 identity, and
its invalid options. The sublayers are f_j(x) = tanh(x W_j), so every output depends on its input."""

import math

import pytest
import torch

from attnres.residual import (
    RESIDUALS,
    AblatedAttnRes,
    BlockAttnRes,
    FullAttnRes,
    Mode,
    Pass,
    RMSNorm,
    build_residual,
)
from attnres.residual.mhc import permutation_matrices

STREAM = Pass(Mode.STREAM)
D, L, EPS = 6, 6, 1e-30  # tiny eps: RMSNorm is scale invariant, so identities up to a scale hold exactly
SHAPE = (2, 3, D)


def rms(x, eps=EPS):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def setup(scheme, seed=0, perturb=True, num_sublayers=L, d=D):
    """Embedding, sublayer weights, norms and the scheme's parameter modules (float64, off their init)."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(*SHAPE[:-1], d, dtype=torch.float64, generator=gen).requires_grad_()
    ws = [(torch.randn(d, d, dtype=torch.float64, generator=gen) / math.sqrt(d)).requires_grad_()
          for _ in range(num_sublayers)]
    norms = []
    for _ in range(num_sublayers + 1):
        norm = RMSNorm(d, EPS).double()
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=gen)
        norms.append(norm)
    params = [scheme.read_params(j, d) for j in range(num_sublayers + 1)]
    params = [None if p is None else p.double() for p in params]
    if perturb:
        with torch.no_grad():
            for p in params:
                for t in [] if p is None else p.parameters():
                    t.add_(0.3 * torch.randn(t.shape, dtype=t.dtype, generator=gen))
    return emb, ws, norms, params


def f(ws):
    return lambda j, x: torch.tanh(x @ ws[j])


def drive(scheme, emb, ws, norms, params, ctx=STREAM):
    """The scheme's reads (normalised sublayer inputs), then its final output."""
    state, reads = scheme.start(emb, ctx), []
    for j in range(scheme.num_sublayers):
        reads.append(scheme.read(state, j, params[j], norms[j], ctx))
        assert scheme.score_bias(state, j, ctx) is None
        state = scheme.write(state, j, f(ws)(j, reads[-1]), ctx, params[j])
    reads.append(scheme.finish(state, params[-1], norms[-1], ctx))
    return reads


def leaves(emb, ws, norms, params):
    out = [emb, *ws, *(n.weight for n in norms)]
    for p in params:
        out += [] if p is None else list(p.parameters())
    return out


def assert_matches(scheme, reference, seed=0, **setup_kw):
    """Forward and every gradient of the scheme equal the reference's (float64)."""
    emb, ws, norms, params = setup(scheme, seed, **setup_kw)
    got, want = drive(scheme, emb, ws, norms, params), reference(emb, f(ws), norms, params)
    assert len(got) == len(want) == scheme.num_sublayers + 1
    for j, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"read {j}")
    weight = [torch.randn(a.shape, dtype=a.dtype, generator=torch.Generator().manual_seed(j))
              for j, a in enumerate(got)]
    inputs = leaves(emb, ws, norms, params)
    g1 = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, weight, strict=True)), inputs, allow_unused=True)
    g2 = torch.autograd.grad(sum((a * w).sum() for a, w in zip(want, weight, strict=True)), inputs, allow_unused=True)
    for i, (a, b, x) in enumerate(zip(g1, g2, inputs, strict=True)):  # unused: a zero gradient
        a, b = (torch.zeros_like(x) if g is None else g for g in (a, b))
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient {i}")


# --------------------------------------------------------------------------- plain statements (ZOO.md)


def ref_standard(emb, f, norms, params, num_sublayers=L):
    h, reads = emb, []
    for j in range(num_sublayers):
        reads.append(norms[j](h))
        h = h + f(j, reads[-1])
    return reads + [norms[-1](h)]


def ref_denseformer(k, p, unit):
    """ZOO §1: X_0 = emb; unit i runs the standard residual from Y_{i-1} to X_i; then (i % p == 0)
    Y_i = sum over m <= i, m = i (mod k) of a_{i,m} X_m."""
    def ref(emb, f, norms, params):
        xs, h, reads = [emb], emb, []
        for j in range(L):
            reads.append(norms[j](h))
            h = h + f(j, reads[-1])
            if (j + 1) % unit == 0:
                i = (j + 1) // unit
                xs.append(h)
                if i % p == 0:
                    ms = [m for m in range(i + 1) if m % k == i % k]
                    a = params[j].weight
                    h = sum(a[n] * xs[m] for n, m in enumerate(ms))
        return reads + [norms[-1](h)]
    return ref


def ref_hc(n, free=True):
    """ZOO §2.1, one stream at a time."""
    def ref(emb, f, norms, params):
        H, reads = [emb] * n, []
        for j in range(L):
            p = params[j]
            hbar = [rms(H[t], 1e-6) for t in range(n)]
            a_m = [p.scale_alpha * torch.tanh(hbar[t] @ p.w_pre) + p.static_pre[t] for t in range(n)]
            x = sum(a_m[t].unsqueeze(-1) * H[t] for t in range(n))
            reads.append(norms[j](x))
            out = f(j, reads[-1])
            b = [p.scale_beta * torch.tanh(hbar[s] @ p.w_post) + p.static_post[s] for s in range(n)]
            new = []
            for s in range(n):
                if free:
                    a_r = [p.scale_alpha * torch.tanh(hbar[t] @ p.w_res[s]) + p.static_res[t * n + s] for t in range(n)]
                    mixed = sum(a_r[t].unsqueeze(-1) * H[t] for t in range(n))
                else:
                    mixed = H[s]
                new.append(mixed + b[s].unsqueeze(-1) * out)
            H = new
        return reads + [norms[-1](sum(H))]
    return ref


def ref_mhc(n, h_res, tau=1.0, iters=20):
    """ZOO §2.2-2.3: coefficients from RMSNorm(vec H); Sinkhorn in linear space; Birkhoff as a sum of
    permutation matrices."""
    perms = permutation_matrices(n).double()

    def ref(emb, f, norms, params):
        H, reads = [emb] * n, []
        for j in range(L):
            p = params[j]
            xv = rms(torch.cat(H, -1), 1e-6) * p.norm_weight
            pre = [torch.sigmoid(p.alpha_pre * (xv @ p.phi_pre[s]) + p.b_pre[s]) for s in range(n)]
            post = [2 * torch.sigmoid(p.alpha_post * (xv @ p.phi_post[t]) + p.b_post[t]) for t in range(n)]
            x = sum(pre[s].unsqueeze(-1) * H[s] for s in range(n))
            reads.append(norms[j](x))
            out = f(j, reads[-1])
            if h_res == "identity":
                res = [[torch.full_like(pre[0], float(t == s)) for s in range(n)] for t in range(n)]
            elif h_res == "sinkhorn":
                m = [[torch.exp((p.alpha_res * (xv @ p.phi_res[t * n + s]) + p.b_res[t * n + s]) / tau)
                      for s in range(n)] for t in range(n)]
                for _ in range(iters):
                    col = [sum(m[t][s] for t in range(n)) for s in range(n)]
                    m = [[m[t][s] / col[s] for s in range(n)] for t in range(n)]
                    row = [sum(m[t]) for t in range(n)]
                    m = [[m[t][s] / row[t] for s in range(n)] for t in range(n)]
                res = m
            else:
                logits = torch.stack([p.alpha_res * (xv @ p.phi_res[r]) + p.b_res[r] for r in range(len(perms))])
                a = torch.softmax(logits, 0)
                res = [[sum(a[r] * perms[r, t, s] for r in range(len(perms))) for s in range(n)] for t in range(n)]
            H = [sum(res[t][s].unsqueeze(-1) * H[s] for s in range(n)) + post[t].unsqueeze(-1) * out
                 for t in range(n)]
        return reads + [norms[-1](sum(H))]
    return ref


def ref_delta(gate):
    """arXiv 2605.18855 (authors' delta mode): h_j = s_j + g_j sum_i softmax_i(w . RMSNorm(v_i) g) v_i over
    v_0 = emb, v_i = f_{i-1} output; read 0 adds nothing; the final output is norm(s)."""
    def ref(emb, f, norms, params):
        s, vs, reads = emb, [emb], []
        for j in range(L):
            h = s
            if j > 0:
                p = params[j]
                logits = torch.stack([(rms(v, 1e-6) * p.key_norm_weight) @ p.pseudo_query for v in vs])
                a = torch.softmax(logits, 0)
                mix = sum(a[i].unsqueeze(-1) * v for i, v in enumerate(vs))
                h = s + (p.gate * mix if gate else mix)
            reads.append(norms[j](h))
            out = f(j, reads[-1])
            s = s + out
            vs.append(out)
        return reads + [norms[-1](s)]
    return ref


def ref_residual_scale(emb, f, norms, params):
    h, reads = emb, []
    for j in range(L):
        reads.append(norms[j](h))
        h = h + params[j].gain * f(j, reads[-1])
    return reads + [norms[-1](h)]


def ref_depth_mha(heads):
    """ZOO §4c, one head at a time."""
    def ref(emb, f, norms, params):
        dh = D // heads
        p0 = params[0]
        ks, us = [rms(emb, 1e-6) @ p0.embed_key_proj.T], [emb @ p0.embed_value_proj.T]
        c, reads = emb, []

        def read(j):
            p = params[j]
            q = rms(c, 1e-6) @ p.query_proj.T
            parts = []
            for g in range(heads):
                sl = slice(g * dh, (g + 1) * dh)
                logits = torch.stack([(q[..., sl] * k[..., sl]).sum(-1) / math.sqrt(dh) for k in ks])
                a = torch.softmax(logits, 0)
                parts.append(sum(a[i].unsqueeze(-1) * u[..., sl] for i, u in enumerate(us)))
            return torch.cat(parts, -1) @ p.out_proj.T

        for j in range(L):
            reads.append(norms[j](read(j)))
            out = f(j, reads[-1])
            ks.append(rms(out, 1e-6) @ params[j].key_proj.T)
            us.append(out @ params[j].value_proj.T)
            c = out
        return reads + [norms[-1](read(L))]
    return ref


def eq6_sources(outs, emb, l, block_size):
    """PAPER Eq. 6: the sources read after l sublayers: b_0, completed blocks, the partial sum if any."""
    done, i = divmod(l, block_size)
    blocks = [emb] + [sum(outs[b * block_size:(b + 1) * block_size]) for b in range(done)]
    return blocks + ([sum(outs[done * block_size:l])] if i else [])


def ref_ablated(block_size, query="static", weights="softmax", key_norm=True, window=None, heads=1,
                head_norm="full", final_aggregation=True):
    """ZOO §3: Full/Block with the Table 4 options, written per source and per channel group."""
    def mix(p, srcs):
        if window is not None:
            srcs = [srcs[0]] + srcs[1:][-window:]
        n, g = len(srcs), D // heads
        if query == "scalar":
            logits = [p.mix_logits[i] * torch.ones(SHAPE[:-1] + (heads,), dtype=torch.float64) for i in range(n)]
        else:
            q = p.pseudo_query
            if query == "input_dependent":
                q = q + rms(srcs[-1], 1e-6) @ p.query_proj.T
            logits = []
            for v in srcs:
                per = []
                for h in range(heads):
                    sl = slice(h * g, (h + 1) * g)
                    if not key_norm:
                        k = v[..., sl]
                    elif head_norm == "group":
                        k = rms(v[..., sl], 1e-6) * p.key_norm_weight[sl]
                    else:
                        k = rms(v, 1e-6)[..., sl] * p.key_norm_weight[sl]
                    per.append((k * q[..., sl]).sum(-1))
                logits.append(torch.stack(per, -1))
        logits = torch.stack(logits)  # [n, ..., H]
        a = torch.softmax(logits, 0) if weights == "softmax" else torch.sigmoid(logits)
        return torch.cat([sum(a[i, ..., h].unsqueeze(-1) * v[..., h * g:(h + 1) * g] for i, v in enumerate(srcs))
                          for h in range(heads)], -1)

    def ref(emb, f, norms, params):
        outs, reads = [], []
        for j in range(L):
            reads.append(norms[j](mix(params[j], eq6_sources(outs, emb, j, block_size))))
            outs.append(f(j, reads[-1]))
        srcs = eq6_sources(outs, emb, L, block_size)
        final = mix(params[L], srcs) if final_aggregation else sum(srcs)
        return reads + [norms[-1](final)]
    return ref


# --------------------------------------------------------------------------- math against the statements

CASES = [
    ("denseformer", {}, ref_denseformer(1, 1, 2)),
    ("denseformer", {"denseformer_dilation": 2}, ref_denseformer(2, 1, 2)),
    ("denseformer", {"denseformer_period": 2, "denseformer_dilation": 2, "denseformer_granularity": "sublayer"},
     ref_denseformer(2, 2, 1)),
    ("hc", {}, ref_hc(4)),
    ("hc", {"hyper_streams": 3, "hc_h_res": "identity"}, ref_hc(3, free=False)),
    ("mhc", {}, ref_mhc(4, "sinkhorn")),
    ("mhc", {"hyper_streams": 3, "mhc_init": "tb", "mhc_sinkhorn_iters": 5}, ref_mhc(3, "sinkhorn", 0.05, 5)),
    ("mhc", {"mhc_h_res": "identity"}, ref_mhc(4, "identity")),
    ("mhc_lite", {"hyper_streams": 3}, ref_mhc(3, "birkhoff")),
    ("delta", {}, ref_delta(True)),
    ("delta", {"delta_gate": "none"}, ref_delta(False)),
    ("residual_scale", {}, ref_residual_scale),
    ("residual_scale", {"residual_scale_shape": "scalar"}, ref_residual_scale),
    ("depth_mha", {"depth_mha_heads": 2}, ref_depth_mha(2)),
    ("depth_mha", {"depth_mha_heads": 1}, ref_depth_mha(1)),
    ("full", {"attn_res_query": "input_dependent"}, ref_ablated(1, query="input_dependent")),
    ("block", {"attn_res_query": "input_dependent"}, ref_ablated(2, query="input_dependent")),
    ("full", {"attn_res_query": "scalar"}, ref_ablated(1, query="scalar")),
    ("full", {"attn_res_weights": "sigmoid"}, ref_ablated(1, weights="sigmoid")),
    ("full", {"attn_res_key_norm": False}, ref_ablated(1, key_norm=False)),
    ("block", {"attn_res_key_norm": False}, ref_ablated(2, key_norm=False)),
    ("full", {"attn_res_window": 2}, ref_ablated(1, window=2)),
    ("block", {"attn_res_window": 1}, ref_ablated(4, window=1)),
    ("block", {"attn_res_heads": 3}, ref_ablated(2, heads=3)),
    ("block", {"attn_res_heads": 2, "attn_res_head_norm": "group"}, ref_ablated(2, heads=2, head_norm="group")),
    ("block", {"attn_res_heads": 2, "attn_res_query": "input_dependent", "attn_res_weights": "sigmoid",
               "attn_res_window": 2}, ref_ablated(2, heads=2, query="input_dependent", weights="sigmoid", window=2)),
]


def scheme_of(name, opts, num_sublayers=L, final_aggregation=True):
    block = {"block": 4 if opts.get("attn_res_window") == 1 else 2}.get(name)
    return build_residual(name, num_sublayers, block_size=block, final_aggregation=final_aggregation, eps=1e-6,
                          hidden_size=D, num_attention_heads=2, **opts)


@pytest.mark.parametrize("name, opts, reference", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}"
                                                             for n, o, _ in CASES])
def test_scheme_equals_its_plain_float64_statement_forward_and_gradients(name, opts, reference):
    scheme = scheme_of(name, opts)
    if name in ("full", "block"):
        assert isinstance(scheme, AblatedAttnRes) and scheme.name == name
    assert_matches(scheme, reference)


def test_ablation_without_final_aggregation_sums_the_windowed_model_sources():
    scheme = scheme_of("block", {"attn_res_window": 1}, final_aggregation=False)
    assert scheme.read_params(L, D) is None
    assert_matches(scheme, ref_ablated(4, window=1, final_aggregation=False))


# --------------------------------------------------------------------------- step-0 identities (ZOO §6)


def reads_at_init(scheme, seed=1):
    emb, ws, norms, params = setup(scheme, seed, perturb=False)
    with torch.no_grad():
        return drive(scheme, emb, ws, norms, params)


def standard_reads(seed=1):
    return reads_at_init(build_residual("standard", L), seed)


def full_reads(seed=1):
    return reads_at_init(build_residual("full", L), seed)


def same(a, b, exact=False):
    for j, (x, y) in enumerate(zip(a, b, strict=True)):
        if exact:
            assert torch.equal(x, y), j
        else:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=f"read {j}")


@pytest.mark.parametrize("opts", [{}, {"denseformer_dilation": 2, "denseformer_period": 2},
                                  {"denseformer_granularity": "sublayer"}])
def test_denseformer_at_init_is_the_standard_residual_exactly(opts):
    same(reads_at_init(scheme_of("denseformer", opts)), standard_reads(), exact=True)


@pytest.mark.parametrize("n", [1, 3, 4])
def test_hc_at_init_is_the_standard_residual(n):
    got = reads_at_init(scheme_of("hc", {"hyper_streams": n}))
    same(got[:-1], standard_reads()[:-1], exact=True)  # every read is one stream, the standard sum
    same(got[-1:], standard_reads()[-1:])  # the output: n x the sum, removed by the final RMSNorm


def test_mhc_tb_init_with_one_stream_and_identity_mixing_is_the_standard_residual():
    same(reads_at_init(scheme_of("mhc", {"hyper_streams": 1, "mhc_h_res": "identity", "mhc_init": "tb"})),
         standard_reads())


def test_mhc_paper_init_is_not_the_standard_residual():
    got = reads_at_init(scheme_of("mhc", {}))
    assert (got[-1] - standard_reads()[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["mhc", "mhc_lite"])
def test_mhc_stream_mixing_is_doubly_stochastic(name):
    scheme = scheme_of(name, {"hyper_streams": 3})
    _, _, _, params = setup(scheme, perturb=True)
    with torch.no_grad():
        for p in params[:-1]:
            p.phi_res.normal_()
            p.b_res.normal_()
            p.alpha_res.fill_(0.1)
        H = torch.randn(3, *SHAPE, dtype=torch.float64)
        res = scheme._coefficients(H, params[2], "post")[2]
    assert res.shape == (*SHAPE[:-1], 3, 3)
    tol = 1e-3 if name == "mhc" else 1e-12
    torch.testing.assert_close(res.sum(-1), torch.ones_like(res.sum(-1)), rtol=0, atol=1e-12)  # rows, last step
    torch.testing.assert_close(res.sum(-2), torch.ones_like(res.sum(-2)), rtol=0, atol=tol)
    assert (res >= 0).all()


def test_delta_at_init_is_the_standard_residual_exactly():
    same(reads_at_init(scheme_of("delta", {})), standard_reads(), exact=True)


def test_ungated_delta_at_init_is_the_standard_residual_after_the_norm():
    # uniform weights over sources that sum to s: h = s + s / n, removed by the PreNorm
    same(reads_at_init(scheme_of("delta", {"delta_gate": "none"})), standard_reads())


def test_residual_scale_with_unit_gains_is_the_standard_residual_exactly():
    same(reads_at_init(scheme_of("residual_scale", {"residual_scale_init": 1.0})), standard_reads(), exact=True)
    assert (reads_at_init(scheme_of("residual_scale", {}))[-1] - standard_reads()[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_depth_mha_at_init_is_full_attnres_at_zero_init(heads):
    same(reads_at_init(scheme_of("depth_mha", {"depth_mha_heads": heads})), full_reads())


@pytest.mark.parametrize("opts", [{"attn_res_query": "input_dependent"}, {"attn_res_query": "scalar"},
                                  {"attn_res_key_norm": False}, {"attn_res_heads": 2},
                                  {"attn_res_heads": 3, "attn_res_head_norm": "group"}])
def test_ablations_at_zero_init_are_full_attnres_at_zero_init(opts):
    same(reads_at_init(scheme_of("full", opts)), full_reads())


@pytest.mark.parametrize("name", ["full", "block"])
def test_sigmoid_at_init_is_the_standard_residual_after_the_norm(name):
    # alpha = 1/2 on every source: h = (sum of the sources) / 2, the standard residual up to a scale
    same(reads_at_init(scheme_of(name, {"attn_res_weights": "sigmoid"})), standard_reads())


def drive_both(a, b, seed=2):
    """Both schemes on the same inputs and the same (perturbed) parameters: ``b``'s DepthQuery modules,
    which the ablation path reads by their parameter names."""
    emb, ws, norms, params = setup(b, seed)
    with torch.no_grad():
        return drive(a, emb, ws, norms, params), drive(b, emb, ws, norms, params)


@pytest.mark.parametrize("window", [L, L + 5])
def test_a_window_at_least_the_depth_is_full_attnres(window):
    got, want = drive_both(AblatedAttnRes(L, 1, name="full", attn_res_window=window), FullAttnRes(L))
    same(got, want)


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_multihead_with_one_head_is_block_attnres(block_size):
    got, want = drive_both(AblatedAttnRes(L, block_size, attn_res_heads=1), BlockAttnRes(L, block_size))
    same(got, want)


def test_multihead_with_group_norm_is_not_block():
    got, want = drive_both(AblatedAttnRes(L, 2, attn_res_heads=2, attn_res_head_norm="group"), BlockAttnRes(L, 2))
    assert (got[-1] - want[-1]).abs().max() > 1e-6


# --------------------------------------------------------------------------- the state and the hook


def test_realformer_carries_the_scores_in_the_state_and_offers_them_as_the_next_bias():
    scheme = build_residual("realformer", 4, realformer_running_mean=True)
    h = torch.randn(*SHAPE, dtype=torch.float64)
    state = scheme.start(h, STREAM)
    first = scheme.score_bias(state, 0, STREAM)
    assert first.bias is None and first.scale == 1.0  # P_0 = 0: layer 1 is standard attention
    scores = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    state = scheme.write(state, 0, h, STREAM, None, scores)
    assert state[1] is scores and torch.equal(state[0], 2 * h)
    state = scheme.write(state, 1, h, STREAM)  # an MLP write keeps P
    second = scheme.score_bias(state, 2, STREAM)
    assert second.bias is scores and second.scale == 0.5  # running mean: (S_2 + P_1) / 2


def test_every_scheme_owns_params_only_where_it_reads_or_writes():
    counts = {name: [scheme_of(name, {}).read_params(j, D) is not None for j in range(L + 1)]
              for name in RESIDUALS}
    assert counts["standard"] == counts["realformer"] == [False] * (L + 1)
    assert counts["full"] == counts["block"] == counts["depth_mha"] == [True] * (L + 1)
    assert counts["hc"] == counts["mhc"] == counts["mhc_lite"] == counts["residual_scale"] == [True] * L + [False]
    assert counts["delta"] == [False] + [True] * (L - 1) + [False]
    assert counts["denseformer"] == [False, True] * (L // 2) + [False]  # one DWA after each decoder layer


# --------------------------------------------------------------------------- invalid options


@pytest.mark.parametrize("name, opts, words", [
    ("full", {"attn_res_window": 0}, "attn_res_window must be an int >= 1 (or None), got 0"),
    ("block", {"attn_res_heads": 4}, "attn_res_heads must divide hidden_size (6), got 4"),
    ("block", {"attn_res_heads": 0}, "attn_res_heads must be an int >= 1, got 0"),
    ("full", {"attn_res_query": "dynamic"}, "attn_res_query must be one of 'static', 'input_dependent', 'scalar'"),
    ("full", {"attn_res_query": "scalar", "attn_res_heads": 2}, "attn_res_heads must be 1 with"),
    ("full", {"attn_res_key_norm": 0}, "attn_res_key_norm must be true or false, got 0"),
    ("hc", {"hyper_streams": 0}, "hyper_streams must be an int >= 1, got 0"),
    ("mhc", {"hyper_streams": -1}, "hyper_streams must be an int >= 1, got -1"),
    ("mhc_lite", {"hyper_streams": 6}, "hyper_streams must be an int >= 1 and <= 5, got 6"),
    ("mhc", {"mhc_sinkhorn_iters": 0}, "mhc_sinkhorn_iters must be an int >= 1, got 0"),
    ("hc", {"hc_h_res": "sinkhorn"}, "hc_h_res must be one of 'free', 'identity', got 'sinkhorn'"),
    ("depth_mha", {"depth_mha_heads": 4}, "depth_mha_heads must divide hidden_size (6), got 4"),
    ("denseformer", {"denseformer_dilation": 0}, "denseformer_dilation must be an int >= 1, got 0"),
    ("denseformer", {"denseformer_granularity": "layer"}, "denseformer_granularity must be one of"),
    ("residual_scale", {"residual_scale_init": float("nan")}, "residual_scale_init must be a number"),
    ("delta", {"delta_gate": "vector"}, "delta_gate must be one of 'scalar', 'none', got 'vector'"),
    ("block", {"hyper_streams": 2}, "hyper_streams=2 is a key of residual=hc/mhc/mhc_lite, not of 'block'"),
    ("standard", {"attn_res_windows": 2}, "unknown residual key 'attn_res_windows'"),
])
def test_invalid_options_are_one_line_errors_naming_value_and_range(name, opts, words):
    with pytest.raises(ValueError) as info:
        scheme_of(name, opts)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_another_schemes_key_at_its_default_is_accepted():
    assert scheme_of("block", {"hyper_streams": 4}).name == "block"


def test_sinkhorn_is_log_space_stable_for_large_logits():
    from attnres.residual.mhc import sinkhorn
    m = sinkhorn(torch.tensor([[500.0, -500.0], [0.0, 800.0]], dtype=torch.float64), 20)
    assert torch.isfinite(m).all()
    torch.testing.assert_close(m.sum(-1), torch.ones(2, dtype=torch.float64))


def test_permutation_matrices_start_with_the_identity_and_are_all_distinct():
    p = permutation_matrices(3)
    assert p.shape == (6, 3, 3) and torch.equal(p[0], torch.eye(3))
    assert len({tuple(x.flatten().tolist()) for x in p}) == 6
    assert torch.equal(p.sum(-1), torch.ones(6, 3)) and torch.equal(p.sum(-2), torch.ones(6, 3))


def test_hc_state_is_n_streams_and_the_output_their_sum():
    scheme = scheme_of("hc", {"hyper_streams": 3})
    emb = torch.randn(*SHAPE, dtype=torch.float64)
    state = scheme.start(emb, STREAM)
    assert len(state) == 1 and state[0].shape == (3, *SHAPE)
    norm = RMSNorm(D, EPS).double()
    torch.testing.assert_close(scheme.finish(state, None, norm, STREAM), norm(3 * emb))
