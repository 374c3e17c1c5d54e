"""A name map that does not match the weights: one line naming the layout and the first offending key."""

import re

import pytest
import torch

from attnres.convert import ConvertError, from_layout, to_layout

from ._tiny import random_model, tiny_config


@pytest.fixture(scope="module")
def fla():
    config = tiny_config("block-aligned")
    sd = random_model(config).state_dict()
    return sd, config, *to_layout(sd, config, "fla")


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text.strip() == text
    return text


def test_missing_key(fla):
    _, _, theirs, cfg = fla
    partial = {k: v for k, v in theirs.items() if not k.startswith("model.layers.2.")}
    with pytest.raises(ConvertError) as e:
        from_layout(partial, cfg, "fla")
    assert _one_line(e) == "layout fla: missing model.layers.2.attn.q_proj.weight (and 12 more)"


def test_unexpected_key_and_the_layout_it_looks_like(fla):
    sd, config, theirs, cfg = fla
    with pytest.raises(ConvertError) as e:
        from_layout({**theirs, "model.layers.0.attn.g_proj.weight": torch.zeros(1)}, cfg, "fla")
    assert _one_line(e) == "layout fla: unexpected key model.layers.0.attn.g_proj.weight"
    k3, _ = to_layout(sd, config, "k3")
    with pytest.raises(ConvertError) as e:  # the wrong --from: every name is missing
        from_layout(k3, cfg, "fla")
    assert _one_line(e) == "layout fla: missing model.embeddings.weight (and 38 more); these names look like layout k3"
    with pytest.raises(ConvertError) as e:  # our names where fla's shared names are expected
        from_layout({**theirs, "model.embed_tokens.weight": sd["model.embed_tokens.weight"]}, cfg, "fla")
    assert _one_line(e).endswith("unexpected key model.embed_tokens.weight; these names look like layout attnres")


def test_shape_mismatch(fla):
    _, _, theirs, cfg = fla
    bad = {**theirs, "model.layers.1.mlp_res_proj.weight": theirs["model.layers.1.mlp_res_proj.weight"].reshape(-1)}
    with pytest.raises(ConvertError) as e:
        from_layout(bad, cfg, "fla")
    assert _one_line(e) == "layout fla: model.layers.1.mlp_res_proj.weight has shape [32], the map needs [1, 32]"
    with pytest.raises(ConvertError, match=r"layout fla: model.embeddings.weight has shape \[61, 32\], the map needs "
                                           r"\[62, 32\]"):
        from_layout(theirs, {**cfg, "vocab_size": 62}, "fla")


def test_our_side_is_checked_too(fla):
    sd, config, _, _ = fla
    with pytest.raises(ConvertError) as e:
        to_layout({k: v for k, v in sd.items() if k != "model.output_res.key_norm_weight"}, config, "gguf")
    assert _one_line(e) == "our state dict (to layout gguf): missing model.output_res.key_norm_weight"
    with pytest.raises(ConvertError, match="unexpected key model.layers.0.mlp_res.bias"):
        to_layout({**sd, "model.layers.0.mlp_res.bias": torch.zeros(3)}, config, "k3")


def test_bad_config():
    with pytest.raises(ConvertError) as e:
        from_layout({}, {"vocab_size": 8, "hidden_size": 8}, "k3")
    assert _one_line(e) == "layout k3: the config lacks intermediate_size (intermediate_size)"
    with pytest.raises(ConvertError, match=r"layout gguf: the config lacks llama.embedding_length \(hidden_size\)"):
        from_layout({}, {"general.architecture": "llama", "llama.vocab_size": 8}, "gguf")
    with pytest.raises(ConvertError, match="layout fla: attnres_block_size must be a positive int, got -2"):
        from_layout({}, {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                         "num_heads": 2, "attnres_block_size": -2}, "fla")
    with pytest.raises(ConvertError, match="^layout k3: the config does not make an attnres model: hidden_size"):
        from_layout({}, dict(vocab_size=8, hidden_size=9, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=2), "k3")
    with pytest.raises(ConvertError, match="unknown layout 'hf'; known: attnres, k3, fla"):
        to_layout({}, tiny_config(), "hf")


@pytest.mark.parametrize("extra, words", [
    (dict(attn_res_window=1), "attn_res_window=1 (a Table 4 option)"),
    (dict(residual="full", attn_res_block_size=None, attn_res_weights="sigmoid"),
     "attn_res_weights='sigmoid' (a Table 4 option)"),
    (dict(residual="hc", attn_res_block_size=None), "residual='hc' has no weight map"),
])
@pytest.mark.parametrize("source", ["attnres", "k3"])
def test_a_scheme_or_table4_option_the_maps_would_drop_is_refused(extra, words, source):
    """Same weight names, another function: converting would silently change what the model computes."""
    config = tiny_config("block-aligned", **extra)
    sd = random_model(config).state_dict()
    with pytest.raises(ConvertError, match=re.escape(words)):
        if source == "attnres":  # our own config.json carries the option; the import must not drop it
            from_layout(sd, config.to_dict(), "attnres")
        else:
            to_layout(sd, config, "k3")
