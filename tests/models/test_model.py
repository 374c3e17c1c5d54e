"""AttnResForCausalLM: a Llama in standard mode, faithful AttnRes otherwise, HF-native throughout."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from attnres import AttnResConfig, AttnResForCausalLM

MODES = ["standard", "full", "block"]
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny(residual="block", **kw):
    return AttnResConfig(**{**TINY, "residual": residual, "attn_res_block_size": 2 if residual == "block" else None,
                            **kw})


def randomize_attnres(model):
    """Move the AttnRes parameters off their init so tests see input-dependent weights."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pseudo_query" in name:
                p.normal_(0, 0.5)
            elif "key_norm_weight" in name:
                p.uniform_(0.5, 1.5)


def ids(b=2, t=11, vocab=97, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_standard_mode_is_a_llama():
    llama_cfg = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="sdpa",
    )
    llama = LlamaForCausalLM(llama_cfg).eval()
    ours = AttnResForCausalLM(tiny("standard")).eval()
    ours.load_state_dict(llama.state_dict(), strict=True)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, llama(x).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("residual", ["full", "block"])
def test_standard_state_dict_loads_with_only_attnres_params_missing(residual):
    standard = AttnResForCausalLM(tiny("standard"))
    model = AttnResForCausalLM(tiny(residual))
    missing, unexpected = model.load_state_dict(standard.state_dict(), strict=False)
    reads = [f"model.layers.{i}.{r}" for i in range(3) for r in ("attn_res", "mlp_res")] + ["model.output_res"]
    assert sorted(missing) == sorted(f"{r}.{p}" for r in reads for p in ("pseudo_query", "key_norm_weight"))
    assert unexpected == []


@pytest.mark.parametrize("residual, extra", [("full", {}), ("block", {}), ("block", {"attn_res_block_size": 6}),
                                             ("block", {"attn_res_block_size": 100})])
def test_zero_init_attnres_with_standard_weights_gives_standard_logits(residual, extra):
    # zero queries mix by the mean; RMSNorm is scale invariant (exactly so only with eps -> 0)
    standard = AttnResForCausalLM(tiny("standard", rms_norm_eps=1e-30)).double().eval()
    model = AttnResForCausalLM(tiny(residual, rms_norm_eps=1e-30, **extra)).double().eval()
    model.load_state_dict(standard.state_dict(), strict=False)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, standard(x).logits, rtol=1e-9, atol=1e-9)


def test_zero_init_is_not_the_standard_model_with_default_eps_or_trained_queries():
    # the property above is a real constraint: trained queries break it
    standard = AttnResForCausalLM(tiny("standard", rms_norm_eps=1e-30)).double().eval()
    model = AttnResForCausalLM(tiny("full", rms_norm_eps=1e-30)).double().eval()
    model.load_state_dict(standard.state_dict(), strict=False)
    randomize_attnres(model)
    x = ids()
    with torch.no_grad():
        assert (model(x).logits - standard(x).logits).abs().max() > 1e-3


@pytest.mark.parametrize("residual", MODES)
def test_causality(residual):
    model = AttnResForCausalLM(tiny(residual)).double().eval()
    randomize_attnres(model)
    x = ids()
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % 97
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-12)
    assert (a[:, 6:] - b[:, 6:]).abs().amax() > 1e-6


@pytest.mark.parametrize("residual", MODES)
def test_generate_with_cache_equals_recomputing_the_prefix(residual):
    torch.manual_seed(1)
    model = AttnResForCausalLM(tiny(residual)).double().eval()
    randomize_attnres(model)
    prompt = ids(t=5)
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    assert torch.equal(cached, greedy_by_recomputing(model, prompt, 12))


def greedy_by_recomputing(model, prompt, n: int):
    """``n`` greedy tokens after ``prompt``, each from a full forward of the whole sequence (no KV cache)."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


def test_cached_decode_logits_match_full_forward_with_left_padding():
    model = AttnResForCausalLM(tiny("block")).double().eval()
    randomize_attnres(model)
    x = ids(t=9)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # row 0 is left padded
    with torch.no_grad():
        full = model(x, attention_mask=mask, use_cache=False).logits
        out = model(x[:, :6], attention_mask=mask[:, :6], use_cache=True)
        step = model(x[:, 6:], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 6:], rtol=1e-10, atol=1e-10)
    # the unpadded row equals its own unmasked forward
    with torch.no_grad():
        torch.testing.assert_close(full[1], model(x[1:]).logits[0], rtol=1e-10, atol=1e-10)


def test_labels_give_the_shifted_cross_entropy():
    model = AttnResForCausalLM(tiny("block"))
    x = ids()
    labels = x.clone()
    labels[0, 4] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 97)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("residual", MODES)
def test_save_load_and_auto_classes_round_trip_exactly(residual, tmp_path):
    model = AttnResForCausalLM(tiny(residual, tie_word_embeddings=True)).eval()
    randomize_attnres(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, AttnResConfig) and config.residual == residual
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, AttnResForCausalLM)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_attnres_parameters_stay_fp32_when_loading_in_bf16(tmp_path):
    AttnResForCausalLM(tiny("block")).save_pretrained(tmp_path)
    model = AttnResForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    attnres = [p for n, p in model.named_parameters() if n.endswith(("pseudo_query", "key_norm_weight"))]
    assert len(attnres) == 2 * (2 * 3 + 1) and all(p.dtype == torch.float32 for p in attnres)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    out = model(ids())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_fresh_model_has_zero_queries_and_unit_gains():
    model = AttnResForCausalLM(tiny("full"))
    inner = model.model
    reads = [m for layer in inner.layers for m in (layer.attn_res, layer.mlp_res)] + [inner.output_res]
    assert [type(m).__name__ for m in reads] == ["DepthQuery"] * (2 * 3 + 1)
    for m in reads:
        assert m.pseudo_query.shape == (48,) and not m.pseudo_query.any() and (m.key_norm_weight == 1).all()
        assert m.pseudo_query.dtype == m.key_norm_weight.dtype == torch.float32


def test_standard_model_has_no_read_parameters():
    model = AttnResForCausalLM(tiny("standard"))
    assert model.model.output_res is None and all(layer.attn_res is None for layer in model.model.layers)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(residual="sum"), "'sum'"),
        (dict(residual="block", attn_res_block_size=0), "attn_res_block_size must be a positive int, got 0"),
        (dict(residual="block", attn_res_block_size=-3), "got -3"),
        (dict(residual="block", attn_res_num_blocks=0), "attn_res_num_blocks"),
        (dict(hidden_size=50), "hidden_size (50) must be divisible by num_attention_heads (4)"),
        (dict(num_key_value_heads=3), "num_key_value_heads (3) must divide num_attention_heads (4)"),
        (dict(residual="block", attn_res_block_size=4, attn_res_block_layers=3), "contradicts"),
        (dict(residual="full", attn_res_block_size=4), "block size 1"),
    ],
)
def test_bad_config_raises_naming_the_value(kw, words):
    with pytest.raises(ValueError) as info:
        AttnResConfig(**{**TINY, **kw})
    assert words in str(info.value)


@pytest.mark.parametrize(
    "kw, block_size",
    [
        (dict(), 1),  # 6 sublayers, N=8 -> S=ceil(6/8)=1
        (dict(attn_res_num_blocks=2), 3),
        (dict(attn_res_num_blocks=4), 2),  # ceil(6/4): 3 blocks, the last one short
        (dict(attn_res_block_layers=2), 4),  # K3 convention: 2 decoder layers = 4 sublayers
        (dict(attn_res_block_size=5), 5),
    ],
)
def test_block_size_resolution(kw, block_size):
    config = AttnResConfig(**{**TINY, "residual": "block", **kw})
    assert config.block_size == block_size


def test_reference_config_has_eight_blocks_of_two_sublayers():
    config = AttnResConfig(residual="block", hidden_size=256, num_hidden_layers=8)
    assert config.block_size == 2
