"""Every comparison scheme and Table 4 option inside AttnResForCausalLM: step-0 identities with a standard
model's weights, causality, cached generation = recomputation, every stream mode the same function,
activation checkpointing, save/load, RealFormer's attention hook against a plain float64 forward, and
one-line config errors."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from attnres import AttnResConfig, AttnResForCausalLM
from attnres.models import enable_activation_checkpointing
from attnres.models.modeling import _rope
from attnres.residual import RESIDUALS, AblatedAttnRes, BlockAttnRes

from .test_model import TINY, greedy_by_recomputing, ids, tiny

ZOO = [
    ("denseformer", {}),
    ("denseformer", {"denseformer_granularity": "sublayer", "denseformer_dilation": 2, "denseformer_period": 2}),
    ("hc", {}),
    ("mhc", {}),
    ("mhc_lite", {"hyper_streams": 3}),
    ("delta", {}),
    ("residual_scale", {}),
    ("realformer", {}),
    ("realformer", {"realformer_running_mean": True}),
    ("depth_mha", {}),
    ("full", {"attn_res_query": "input_dependent"}),
    ("full", {"attn_res_query": "scalar", "attn_res_window": 2}),
    ("full", {"attn_res_weights": "sigmoid", "attn_res_key_norm": False}),
    ("block", {"attn_res_heads": 4, "attn_res_head_norm": "group"}),
]
IDS = [f"{r}-{'-'.join(map(str, o.values()))}" if o else r for r, o in ZOO]


def build(residual, opts, seed=0, **kw):
    torch.manual_seed(seed)
    model = AttnResForCausalLM(tiny(residual, **opts, **kw)).double()
    perturb(model, seed)
    return model


def perturb(model, seed=0):
    """Move every residual-scheme parameter off its init, so outputs depend on all of them."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_res." in name:
                p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=gen))


def test_every_registered_scheme_is_in_this_file():
    assert {r for r, _ in ZOO} | {"standard"} == set(RESIDUALS)


@pytest.mark.parametrize("residual, opts", ZOO, ids=IDS)
def test_causality(residual, opts):
    model = build(residual, opts).eval()
    x = ids()
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % 97
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-12)
    assert (a[:, 6:] - b[:, 6:]).abs().amax() > 1e-6


@pytest.mark.parametrize("residual, opts", ZOO, ids=IDS)
def test_generate_with_the_kv_cache_equals_recomputing_the_prefix(residual, opts):
    model = build(residual, opts).eval()
    prompt = ids(t=5)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(cached, greedy_by_recomputing(model, prompt, 8))
    with torch.no_grad():
        x = ids(t=9)  # and the logits of cached steps equal the full forward's
        out = model(x[:, :6], use_cache=True)
        step = model(x[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits
        torch.testing.assert_close(step, model(x, use_cache=False).logits[:, 6:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("residual, opts", ZOO, ids=IDS)
def test_every_stream_mode_computes_the_same_function(residual, opts):
    """Schemes beyond Full/Block keep one layout: the bank (no grad, few tokens), two-phase (grad, >= 64
    tokens) and recorded forwards (the plain stream) give the same logits; every read is recorded."""
    model = build(residual, opts)
    for t in (5, 40):
        x = ids(t=t)
        with torch.no_grad(), model.model.record() as reads:
            want = model(x).logits
        assert [r.read for r in reads] == list(range(2 * 3 + 1))
        with torch.no_grad():
            torch.testing.assert_close(model(x, use_cache=False).logits, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(x, use_cache=False).logits.detach(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("residual, opts", ZOO, ids=IDS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(residual, opts, reentrant):
    model = build(residual, opts).train()
    x = ids(t=7)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=reentrant)
        model.zero_grad()
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    scheme_params = [n for n in grads[0] if "_res." in n]
    assert scheme_params or residual == "realformer"
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12, msg=name)
        assert torch.isfinite(grads[0][name]).all(), name


@pytest.mark.parametrize("residual, opts", ZOO, ids=IDS)
def test_save_load_and_auto_classes_round_trip_exactly(residual, opts, tmp_path):
    model = build(residual, opts).float().eval()
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.residual == residual and config.residual_options() == model.config.residual_options()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded.model.residual) is type(model.model.residual)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_scheme_parameters_stay_fp32_when_loading_in_bf16(tmp_path):
    AttnResForCausalLM(tiny("hc")).save_pretrained(tmp_path)
    model = AttnResForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    scheme = [p for n, p in model.named_parameters() if "_res." in n]
    assert scheme and all(p.dtype == torch.float32 for p in scheme)
    out = model(ids())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


# --------------------------------------------------------------------------- step 0 (ZOO.md §6)

STEP0 = [  # a fresh model of each, given a standard model's weights, computes the standard model's function
    ("denseformer", {}),
    ("denseformer", {"denseformer_dilation": 2, "denseformer_period": 2}),
    ("hc", {}),  # the output is n x the standard sum: the final RMSNorm removes it
    ("mhc", {"hyper_streams": 1, "mhc_h_res": "identity", "mhc_init": "tb"}),
    ("delta", {}),
    ("delta", {"delta_gate": "none"}),
    ("residual_scale", {"residual_scale_init": 1.0}),
    ("depth_mha", {}),  # = Full AttnRes at zero init, itself the standard model after the PreNorms
    ("full", {"attn_res_query": "input_dependent"}),
    ("full", {"attn_res_query": "scalar"}),
    ("full", {"attn_res_key_norm": False}),
    ("full", {"attn_res_weights": "sigmoid"}),
    ("block", {"attn_res_weights": "sigmoid"}),
    ("block", {"attn_res_heads": 4}),
]  # not a window shorter than the depth: its mean leaves out the older sources


@pytest.mark.parametrize("residual, opts", STEP0, ids=[f"{r}-{'-'.join(map(str, o.values()))}" for r, o in STEP0])
def test_fresh_scheme_with_standard_weights_is_the_standard_model(residual, opts):
    standard = AttnResForCausalLM(tiny("standard", rms_norm_eps=1e-30)).double().eval()
    model = AttnResForCausalLM(tiny(residual, rms_norm_eps=1e-30, **opts)).double().eval()
    missing, unexpected = model.load_state_dict(standard.state_dict(), strict=False)
    assert unexpected == [] and all("_res." in n for n in missing)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, standard(x).logits, rtol=1e-9, atol=1e-9)


def test_a_window_is_not_full_attnres_once_trained():
    full = build("full", {})
    windowed = AttnResForCausalLM(tiny("full", attn_res_window=2)).double()
    windowed.load_state_dict(full.state_dict())
    x = ids()
    with torch.no_grad():
        assert (windowed(x).logits - full(x).logits).abs().max() > 1e-4


def test_exact_step0_identities_hold_bit_for_bit():
    standard = AttnResForCausalLM(tiny("standard")).double().eval()
    x = ids()
    for residual, opts in [("denseformer", {}), ("delta", {}), ("residual_scale", {"residual_scale_init": 1.0})]:
        model = AttnResForCausalLM(tiny(residual, **opts)).double().eval()
        model.load_state_dict(standard.state_dict(), strict=False)
        with torch.no_grad():
            assert torch.equal(model(x).logits, standard(x).logits), residual


def test_realformer_with_one_layer_is_the_standard_model():
    standard = AttnResForCausalLM(tiny("standard", num_hidden_layers=1)).double().eval()
    real = AttnResForCausalLM(tiny("realformer", num_hidden_layers=1)).double().eval()
    real.load_state_dict(standard.state_dict(), strict=True)  # no parameters of its own
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(real(x).logits, standard(x).logits, rtol=1e-12, atol=1e-12)
    deeper_standard = AttnResForCausalLM(tiny("standard")).double().eval()
    deeper = AttnResForCausalLM(tiny("realformer")).double().eval()
    deeper.load_state_dict(deeper_standard.state_dict(), strict=True)
    with torch.no_grad():  # from layer 2 on the carried scores change the function
        assert (deeper(x).logits - deeper_standard(x).logits).abs().max() > 1e-6


# --------------------------------------------------------------------------- RealFormer's hook, written out


def realformer_logits(model, x, running_mean, attention_mask=None):
    """RealFormer (ZOO §4b) with every attention written out: S_l = QK^T/sqrt(d_h), softmax(S_l + P_{l-1}
    + mask) (over l with the running mean), P_l = S_l + P_{l-1}; GQA by repeating K/V heads."""
    inner, cfg = model.model, model.config
    b, t = x.shape
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    h = inner.embed_tokens(x)
    cos, sin = inner._rope(torch.arange(t)[None], h.dtype)
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    if attention_mask is not None:
        allowed = (allowed & attention_mask.bool()[:, None, None, :]) | torch.eye(t, dtype=torch.bool)
    prev = torch.zeros(b, heads, t, t, dtype=h.dtype)
    for layer_no, layer in enumerate(inner.layers, start=1):
        a = layer.self_attn
        xn = layer.input_layernorm(h)
        q = _rope(a.q_proj(xn).view(b, t, heads, hd).transpose(1, 2), cos, sin)
        k = _rope(a.k_proj(xn).view(b, t, kv, hd).transpose(1, 2), cos, sin).repeat_interleave(heads // kv, 1)
        v = a.v_proj(xn).view(b, t, kv, hd).transpose(1, 2).repeat_interleave(heads // kv, 1)
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        total = s + prev
        logits = total / layer_no if running_mean else total
        p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
        h = h + a.o_proj((p @ v).transpose(1, 2).reshape(b, t, -1))
        prev = total
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))


@pytest.mark.parametrize("running_mean", [False, True])
def test_realformer_equals_its_written_out_forward_and_gradients(running_mean):
    model = build("realformer", {"realformer_running_mean": running_mean})
    x = ids()
    got = model(x).logits
    want = realformer_logits(model, x, running_mean)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    w = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad((got * w).sum(), params), torch.autograd.grad((want * w).sum(), params),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_realformer_with_left_padding_and_a_cache():
    model = build("realformer", {}).eval()
    x = ids(t=9)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(x, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(full, realformer_logits(model, x, False, mask), rtol=1e-10, atol=1e-10)
        out = model(x[:, :6], attention_mask=mask[:, :6], use_cache=True)
        step = model(x[:, 6:], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 6:], rtol=1e-10, atol=1e-10)


def test_realformer_attentions_are_the_biased_probabilities():
    model = build("realformer", {}).eval()
    standard = AttnResForCausalLM(tiny("standard")).double().eval()
    standard.load_state_dict(model.state_dict())
    x = ids()
    with torch.no_grad():
        a = model(x, output_attentions=True).attentions
        b = standard(x, output_attentions=True).attentions
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)  # layer 1: no bias yet
    assert (a[1] - b[1]).abs().max() > 1e-6
    torch.testing.assert_close(a[1].sum(-1), torch.ones_like(a[1].sum(-1)))


# --------------------------------------------------------------------------- parameters and config


def test_full_and_block_keep_the_fast_scheme_and_depth_query_names_at_default_options():
    for residual in ("full", "block"):
        model = AttnResForCausalLM(tiny(residual))
        scheme = model.model.residual
        assert isinstance(scheme, BlockAttnRes) and not isinstance(scheme, AblatedAttnRes) and scheme.has_queries
        assert type(model.model.layers[0].attn_res).__name__ == "DepthQuery"
        ablated = AttnResForCausalLM(tiny(residual, attn_res_window=3))
        assert isinstance(ablated.model.residual, AblatedAttnRes)
        assert {n for n, _ in ablated.named_parameters() if "_res." in n} == {
            n for n, _ in model.named_parameters() if "_res." in n}  # a Full/Block checkpoint loads as is


@pytest.mark.parametrize("kw, words", [
    (dict(residual="full", attn_res_window=0), "attn_res_window must be an int >= 1 (or None), got 0"),
    (dict(residual="block", attn_res_heads=5), "attn_res_heads must divide hidden_size (48), got 5"),
    (dict(residual="depth_mha", depth_mha_heads=5), "depth_mha_heads must divide hidden_size (48), got 5"),
    (dict(residual="hc", hyper_streams=0), "hyper_streams must be an int >= 1, got 0"),
    (dict(residual="mhc_lite", hyper_streams=7), "hyper_streams must be an int >= 1 and <= 5, got 7"),
    (dict(residual="block", hyper_streams=2), "hyper_streams=2 is a key of residual=hc/mhc/mhc_lite, not of 'block'"),
    (dict(residual="denseformer", denseformer_period=0), "denseformer_period must be an int >= 1, got 0"),
    (dict(residual="realformer", realformer_running_mean="yes"), "realformer_running_mean must be true or false"),
    (dict(residual="zoo"), "residual must be one of standard, block, full, denseformer"),
])
def test_bad_scheme_config_raises_one_line_naming_the_value(kw, words):
    with pytest.raises(ValueError) as info:
        AttnResConfig(**{**TINY, **kw})
    assert words in str(info.value) and "\n" not in str(info.value)


def test_only_the_chosen_schemes_keys_are_config_attributes():
    config = AttnResConfig(**TINY, residual="hc", hyper_streams=2)
    assert config.hyper_streams == 2 and config.hc_h_res == "free" and not hasattr(config, "attn_res_window")
    assert config.block_size is None
    again = AttnResConfig.from_dict(config.to_dict())
    assert again.residual_options() == {"hyper_streams": 2, "hc_h_res": "free"}


def test_every_scheme_draws_the_shared_weights_of_the_standard_model():
    """Arms compared on equal terms start from the same shared weights: no scheme takes from the global RNG."""
    models = {}
    for residual in RESIDUALS:
        torch.manual_seed(0)
        models[residual] = AttnResForCausalLM(tiny(residual)).state_dict()
    ref = models["standard"]
    for residual, sd in models.items():
        assert [k for k in ref if not torch.equal(ref[k], sd[k])] == [], residual
