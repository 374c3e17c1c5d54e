"""RoPE scaling (``linear``, ``llama3``), held to transformers' Llama as the oracle.

A tiny random LlamaForCausalLM with ``rope_scaling`` saved to tmp and upcycled with ``--residual standard``
gives transformers' logits (fp32) at positions past ``original_max_position_embeddings``, where the scaling
changes them; the config survives save / load; other RoPE types are one-line errors.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from attnres import AttnResConfig, AttnResForCausalLM
from attnres.convert import ConvertError, upcycle
from attnres.models import rope

ORIGINAL = 32  # original_max_position_embeddings; the inputs are longer
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    # head_dim 8, theta 500: wavelengths 6.3 (kept), 30 (smoothed), 140 and 663 (divided by factor)
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
}


def tiny_llama(scaling: dict | None) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * ORIGINAL,
                         rope_parameters={"rope_theta": 500.0, **(scaling or {"rope_type": "default"})})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_inv_freq_equals_transformers(kind):
    source = tiny_llama(SCALINGS[kind])
    theirs, factor = ROPE_INIT_FUNCTIONS[kind](source.config, torch.device("cpu"))
    ours = rope.inv_freq(rope.standardize(SCALINGS[kind], 500.0), 8)
    assert factor == 1.0 and torch.equal(ours, theirs)
    assert not torch.equal(ours, rope.inv_freq(rope.standardize(None, 500.0), 8))  # the scaling changes them


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_upcycled_standard_equals_transformers_past_the_original_length(tmp_path, kind):
    source = tiny_llama(SCALINGS[kind])
    source.save_pretrained(tmp_path / "src")
    upcycle(tmp_path / "src", tmp_path / "out", "standard")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["rope_parameters"] == {"rope_theta": 500.0, **SCALINGS[kind]}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model, AttnResForCausalLM) and model.config.rope_parameters["rope_type"] == kind
    ids = torch.randint(0, 61, (2, 3 * ORIGINAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = source(ids, use_cache=False).logits
        ours = model(ids, use_cache=False).logits
        assert rel(ours, ref) < 1e-5
        # cached decode past the original length too (the bank / KV-cache path takes positions from the cache)
        out = model(ids[:, :-4], use_cache=True)
        step = model(ids[:, -4:], past_key_values=out.past_key_values, use_cache=True).logits
        assert rel(step, ref[:, -4:]) < 1e-5
        unscaled = tiny_llama(None)(ids, use_cache=False).logits
        assert rel(unscaled, ref) > 1e-3  # the scaling matters at these positions


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_config_round_trip(tmp_path, kind):
    config = AttnResConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, residual="block", rope_theta=500.0, rope_parameters=SCALINGS[kind])
    assert config.rope_parameters == {"rope_theta": 500.0, **SCALINGS[kind]} and config.rope_theta == 500.0
    config.save_pretrained(tmp_path)
    again = AttnResConfig.from_pretrained(tmp_path)
    assert again.rope_parameters == config.rope_parameters and again.rope_theta == 500.0
    model = AttnResForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 61, (1, 2 * ORIGINAL), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_default_and_legacy_spellings():
    assert AttnResConfig(rope_theta=500.0).rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    legacy = AttnResConfig(rope_scaling={"type": "linear", "factor": 2.0})
    assert legacy.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    # the dict's rope_theta wins over the default argument (transformers' priority)
    assert AttnResConfig(rope_parameters={"rope_type": "default", "rope_theta": 7.0}).rope_theta == 7.0


@pytest.mark.parametrize("params, match", [
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
     "RoPE type 'yarn' is not supported; supported: default, linear, llama3"),
    ({"rope_type": "dynamic", "factor": 2.0}, "RoPE type 'dynamic' is not supported"),
    ({"rope_type": "linear"}, "rope_type 'linear' needs factor"),
    ({"rope_type": "linear", "factor": 0}, "factor of rope_type 'linear' must be a positive number"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 32}, "key 'beta_fast' is not used by rope_type 'linear'"),
    ({**SCALINGS["llama3"], "low_freq_factor": 4.0}, "low_freq_factor < high_freq_factor"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor must be 1"),
    ({"rope_type": "default", "rope_theta": 7.0}, "rope_theta=500.0 differs from rope_parameters' rope_theta=7.0"),
])
def test_bad_rope_parameters_are_one_line_errors(params, match):
    with pytest.raises(ValueError, match=match) as e:
        AttnResConfig(rope_theta=500.0, rope_parameters=params)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("params", [
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
    {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
     "original_max_position_embeddings": 32},
])
def test_upcycle_refuses_other_rope_types(tmp_path, params):
    tiny_llama(params).save_pretrained(tmp_path / "src")
    with pytest.raises(ConvertError, match=f"RoPE type '{params['rope_type']}'.*supported: default, linear, llama3"):
        upcycle(tmp_path / "src", tmp_path / "out", "standard")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["attnres", "k3"])
def test_layouts_with_rope_parameters_carry_the_scaling(layout):
    from attnres.convert import from_layout, to_layout

    config = AttnResConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, residual="block", attn_res_block_size=2, rope_theta=500.0,
                           rope_parameters=SCALINGS["llama3"])
    model = AttnResForCausalLM(config)
    theirs, foreign = to_layout(model.state_dict(), config, layout)
    _, kwargs = from_layout(theirs, json.loads(json.dumps(foreign)), layout)
    assert AttnResConfig(**kwargs).rope_parameters == config.rope_parameters


@pytest.mark.parametrize("layout", ["fla", "torchtitan", "megatron", "gguf"])
def test_layouts_without_rope_scaling_refuse_it(layout):
    from attnres.convert import to_layout

    config = AttnResConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, residual="block", attn_res_block_size=2,
                           rope_parameters=SCALINGS["linear"])
    with pytest.raises(ConvertError, match=f"layout {layout}: RoPE type 'linear' has no form"):
        to_layout(AttnResForCausalLM(config).state_dict(), config, layout)


def test_scaled_rope_traces_to_one_graph():
    import torch._dynamo as dynamo

    config = AttnResConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, residual="block", rope_theta=500.0,
                           rope_parameters=SCALINGS["llama3"])
    x = torch.randint(0, 61, (1, 2 * ORIGINAL), generator=torch.Generator().manual_seed(3))
    ex = dynamo.explain(AttnResForCausalLM(config))(x, labels=x, use_cache=False)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [str(b.reason) for b in ex.break_reasons]
