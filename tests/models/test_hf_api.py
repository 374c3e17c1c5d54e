"""The HF calling conventions, held to transformers' own Llama as the oracle (standard mode)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnres import AttnResForCausalLM
from attnres.models.modeling import CACHE_FIELD

from .test_model import MODES, TINY, ids, randomize_attnres, tiny


def llama_and_ours(attn="sdpa"):
    """Llama's eager attention turns left-padded rows into NaN (0 * NaN from fully masked queries),
    so generation is compared with SDPA, attention weights with eager on unpadded input."""
    cfg = LlamaConfig(
        **TINY, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    llama = LlamaForCausalLM(cfg).double().eval()
    ours = AttnResForCausalLM(tiny("standard")).double().eval()
    ours.load_state_dict(llama.state_dict(), strict=True)
    return llama, ours


def padded_batch():
    x = ids(b=3, t=7, seed=3)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return x.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("sample", [False, True])
def test_generate_equals_llama_generate_token_for_token(sample):
    llama, ours = llama_and_ours()
    x, mask = padded_batch()
    # eos 2 is LlamaConfig's default; rows that reach it are padded from there on
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=sample, pad_token_id=0, eos_token_id=2, use_cache=True)
    if sample:
        kw.update(top_k=0, temperature=1.5)  # a flat distribution, so different draws would show
    for seed in range(3):
        outs = []
        for model in (llama, ours):
            torch.manual_seed(seed)
            outs.append(model.generate(x, **kw))
        assert outs[0].shape == (3, 17)
        assert torch.equal(outs[1], outs[0])


def test_unknown_keyword_is_a_type_error_naming_it():
    model = AttnResForCausalLM(tiny("block"))
    with pytest.raises(TypeError, match="past_key_value\\b"):
        model(ids(), past_key_value=None)
    with pytest.raises(TypeError, match="frobnicate"):
        model.model(ids(), frobnicate=1)


@pytest.mark.parametrize("residual", MODES)
def test_both_cache_keywords_continue_the_same_cache(residual):
    model = AttnResForCausalLM(tiny(residual)).double().eval()
    randomize_attnres(model)
    x = ids(t=9)
    with torch.no_grad():
        full = model(x, use_cache=False).logits[:, 6:]
        for name in ("cache", "past_key_values"):
            prefix = model(x[:, :6], use_cache=True)
            step = model(x[:, 6:], use_cache=True, **{name: getattr(prefix, CACHE_FIELD)})
            torch.testing.assert_close(step.logits, full, rtol=1e-10, atol=1e-10)
            assert getattr(step, CACHE_FIELD).get_seq_length() == 9
        prefix = model(x[:, :6], use_cache=True)
        with pytest.raises(TypeError, match="different caches"):
            model(x[:, 6:], cache=getattr(prefix, CACHE_FIELD), past_key_values=getattr(model(x), CACHE_FIELD))


# Llama's RMSNorm computes in fp32 even for fp64 inputs; ours keeps fp64
LLAMA_TOL = dict(rtol=1e-6, atol=1e-6)


def test_hidden_states_and_attentions_equal_llamas():
    llama, ours = llama_and_ours("eager")
    x = ids(b=3, t=7, seed=3)
    with torch.no_grad():
        want = llama(x, output_hidden_states=True, output_attentions=True)
        got = ours(x, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(want.hidden_states) == TINY["num_hidden_layers"] + 1
    assert len(got.attentions) == len(want.attentions) == TINY["num_hidden_layers"]
    for g, w in zip(got.hidden_states + got.attentions, want.hidden_states + want.attentions, strict=True):
        torch.testing.assert_close(g, w, **LLAMA_TOL)
    torch.testing.assert_close(got.logits, want.logits, **LLAMA_TOL)


@pytest.mark.parametrize("residual", ["full", "block"])
def test_attnres_hidden_states_are_the_layer_reads(residual):
    model = AttnResForCausalLM(tiny(residual)).double().eval()
    randomize_attnres(model)
    x = ids()
    with torch.no_grad():
        plain = model(x)
        out = model(x, output_hidden_states=True, output_attentions=True)
        with model.model.record() as reads:
            model(x)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-10, atol=1e-10)
    h = out.hidden_states
    assert len(h) == 4 and torch.equal(h[0], model.model.embed_tokens(x))
    for layer in (1, 2):  # the attention read of decoder layer `layer` is read point 2 * layer
        rms = h[layer].pow(2).mean().sqrt().item()
        recorded = reads[2 * layer]
        assert recorded.read == 2 * layer and rms == pytest.approx(recorded.hidden_rms, rel=1e-6)  # fp32 record
    for p in out.attentions:
        assert p.shape == (2, 4, 11, 11)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 11, dtype=p.dtype))
        assert not p.triu(1).any()


def test_return_dict_false_gives_a_tuple():
    model = AttnResForCausalLM(tiny("block")).eval()
    x = ids()
    with torch.no_grad():
        out = model(x, labels=x, return_dict=False, use_cache=False)
        ref = model(x, labels=x, use_cache=False)
    assert isinstance(out, tuple)
    assert torch.equal(out[0], ref.loss) and torch.equal(out[1], ref.logits)


def test_num_items_in_batch_sums_the_loss_over_it():
    model = AttnResForCausalLM(tiny("block")).eval()
    x = ids()
    with torch.no_grad():
        mean = model(x, labels=x).loss
        scaled = model(x, labels=x, num_items_in_batch=torch.tensor(40)).loss
    torch.testing.assert_close(scaled, mean * 20 / 40)  # 2 rows x 10 predicted tokens


def test_saved_config_keeps_the_number_of_blocks_not_a_resolved_size(tmp_path):
    from transformers import AutoConfig

    config = tiny("block", attn_res_block_size=None, attn_res_num_blocks=3)
    assert config.block_size == 2
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path, num_hidden_layers=6)
    assert loaded.attn_res_block_size is None and loaded.attn_res_num_blocks == 3
    assert loaded.block_size == 4  # 12 sublayers in 3 blocks
    assert AttnResForCausalLM(loaded).model.residual.num_blocks == 3
