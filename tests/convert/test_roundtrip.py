"""Exact round trips through every layout, the block-size units, layer 0's unread read, and a final
aggregation a checkpoint may lack."""

import pytest
import torch

from attnres import AttnResConfig
from attnres.convert import LAYOUTS, ConvertError, from_layout, get_layout, plan, to_layout

from ._tiny import CASES, expressible, load, logits, random_model, tiny_config

IDS = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
PAIRS = [(lay, case, final) for lay in LAYOUTS for case in CASES for final in (True, False)
         if case != "standard" or final]


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _ours_back(sd, back, layout):
    """Our dict after a trip through ``layout``: the same, except GGUF's split-less fused score."""
    if layout != "gguf":
        return _same(back, sd)
    assert set(back) == set(sd)
    for k, v in sd.items():
        if k.endswith("pseudo_query"):
            assert torch.equal(back[k], v * sd[k.replace("pseudo_query", "key_norm_weight")]), k
        elif k.endswith("key_norm_weight"):
            assert torch.equal(back[k], torch.ones_like(v)), k
        else:
            assert torch.equal(back[k], v), k


@pytest.mark.parametrize("layout,case,final", PAIRS)
def test_round_trip_is_exact(layout, case, final):
    config = tiny_config(case, final)
    model = random_model(config)
    sd = model.state_dict()
    if not expressible(layout, case):
        with pytest.raises(ConvertError, match=f"layout {layout} counts .* in decoder layers") as e:
            to_layout(sd, config, layout)
        assert "\n" not in str(e.value)
        return
    theirs, their_config = to_layout(sd, config, layout)
    back, kwargs = from_layout(theirs, their_config, layout)
    config2 = AttnResConfig(**kwargs)
    assert (config2.residual, config2.block_size) == (config.residual, config.block_size)
    if case != "standard":
        assert config2.attn_res_final_aggregation == final
    _ours_back(sd, back, layout)
    assert torch.equal(logits(load(config2, back), IDS), logits(model, IDS))  # GGUF too: q * g is what a read uses
    again, again_config = to_layout(back, config2, layout)  # and the foreign dict comes back exactly
    _same(again, theirs)
    assert again_config == their_config


def test_foreign_names_are_the_layouts_own():
    config = tiny_config("block-aligned")
    sd = random_model(config).state_dict()
    names = {lay: set(to_layout(sd, config, lay)[0]) for lay in LAYOUTS}
    assert "language_model.model.layers.2.self_attention_res_proj.weight" in names["k3"]
    assert "language_model.model.output_attn_res_norm.weight" in names["k3"]
    assert "language_model.lm_head.weight" in names["k3"]
    assert {"model.layers.1.mlp_res_proj.weight", "model.res_norm.weight", "model.embeddings.weight",
            "model.layers.0.attn_norm.weight"} <= names["fla"]
    assert {"layers.1.ffn_res_norm.weight", "output_res_proj.weight", "layers.0.attention.wq.weight",
            "layers.2.feed_forward.w3.weight", "output.weight"} <= names["torchtitan"]
    assert {"decoder.layers.5.attn_res.pseudo_query", "decoder.final_attn_res.key_norm_weight"} <= names["megatron"]
    assert {"blk.2.ffn_res_score.weight", "output_res_score.weight", "token_embd.weight"} <= names["gguf"]
    assert not any("norm" in n and "res" in n for n in names["gguf"])  # fused: no separate gain


def test_shapes_row_vector_fused():
    config = tiny_config("block-aligned")
    sd = random_model(config).state_dict()
    assert to_layout(sd, config, "k3")[0]["language_model.model.layers.1.mlp_res_proj.weight"].shape == (1, 32)
    assert to_layout(sd, config, "megatron")[0]["decoder.layers.3.attn_res.pseudo_query"].shape == (32,)
    score = to_layout(sd, config, "gguf")[0]["blk.1.ffn_res_score.weight"]
    q, g = sd["model.layers.1.mlp_res.pseudo_query"], sd["model.layers.1.mlp_res.key_norm_weight"]
    assert torch.equal(score, q * g)


@pytest.mark.parametrize("case,units", [
    ("block-aligned", {"attnres": 4, "k3": 2, "fla": 4, "torchtitan": (2, 2), "megatron": 4, "gguf": 2}),
    ("block-one", {"attnres": 6, "k3": 3, "fla": 6, "torchtitan": (3, 1), "megatron": 6, "gguf": 3}),
    ("full", {"attnres": 1, "fla": 1, "megatron": 1}),
    ("standard", {"attnres": None, "k3": None, "fla": None, "torchtitan": None, "megatron": None, "gguf": None}),
])
def test_block_size_units(case, units):
    config = tiny_config(case)
    got = {lay: _block_key(lay, to_layout(random_model(config).state_dict(), config, lay)[1]) for lay in units}
    assert got == units


def _block_key(layout, c):
    return {"attnres": lambda: c["attn_res_block_size"] if c["residual"] != "full" else 1,
            "k3": lambda: c["attn_res_block_size"], "fla": lambda: c["attnres_block_size"],
            "torchtitan": lambda: (c["attn_res"]["layers_per_block"], c["attn_res"]["num_blocks"])
            if c["attn_res"]["enabled"] else None,
            "megatron": lambda: c["attn_res_block_layers"],
            "gguf": lambda: c.get("llama.attn_res_block_size")}[layout]()


def test_foreign_units_import():
    """Hand-written foreign configs give our S: K3 12 layers = 24 sublayers; torchtitan num_blocks alone is
    ceil(L / n) layers per block; fla counts sublayers; Megatron hybrid entries are sublayers."""
    arch = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=93, num_attention_heads=2)
    k3 = get_layout("k3").config_in({**arch, "attn_res_block_size": 12})
    assert AttnResConfig(**k3).block_size == 24
    assert get_layout("k3").config_in({**arch, "attn_res_block_size": 0})["residual"] == "standard"
    titan = {"vocab_size": 8, "dim": 8, "hidden_dim": 8, "n_layers": 93, "n_heads": 2,
             "attn_res": {"enabled": True, "num_blocks": 8}}
    assert AttnResConfig(**get_layout("torchtitan").config_in(titan)).block_size == 24  # ceil(93 / 8) = 12
    fla = {**arch, "num_heads": 2, "attnres_block_size": 5}
    assert AttnResConfig(**get_layout("fla").config_in(fla)).block_size == 5
    assert get_layout("fla").config_in({**fla, "attnres_block_size": 1})["residual"] == "full"
    meg = {"vocab_size": 8, "hidden_size": 8, "ffn_hidden_size": 8, "num_attention_heads": 2, "num_layers": 4,
           "is_hybrid_model": True, "hybrid_layer_pattern": "*-|*-", "enable_attention_residuals": True,
           "attn_res_block_layers": 3}
    got = get_layout("megatron").config_in(meg)
    assert (got["num_hidden_layers"], AttnResConfig(**got).block_size) == (2, 3)


def test_unexpressible_sizes_are_one_line_errors():
    config = tiny_config("block-one", num_hidden_layers=2, attn_res_block_size=8)  # a block longer than the model
    with pytest.raises(ConvertError, match="layout torchtitan: blocks of 4 layers are longer"):
        to_layout(random_model(config).state_dict(), config, "torchtitan")
    with pytest.raises(ConvertError, match="layout megatron: only a hybrid stack"):
        get_layout("megatron").config_in({"is_hybrid_model": True, "hybrid_layer_pattern": "*E*E"})
    with pytest.raises(ConvertError, match="layout fla: qk_norm=True has no attnres form"):
        get_layout("fla").config_in({"qk_norm": True})
    with pytest.raises(ConvertError, match="attn_res.norm_eps=1e-05 differs"):
        get_layout("torchtitan").config_in({"vocab_size": 8, "dim": 8, "hidden_dim": 8, "n_layers": 2, "n_heads": 2,
                                            "norm_eps": 1e-6, "attn_res": {"enabled": True, "num_blocks": 1,
                                                                           "norm_eps": 1e-5}})


# ----------------------------------------------------------------------------- layer 0's pre-attention read


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer0_read_written_and_optional_on_import(layout):
    config = tiny_config("block-aligned")
    model = random_model(config)
    theirs, their_config = to_layout(model.state_dict(), config, layout)
    layer0 = [e.theirs for e in plan(config, layout) if e.ours[0].startswith("model.layers.0.attn_res.")]
    assert layer0 and all(k in theirs for k in layer0)  # exports always write it
    for k in layer0:
        del theirs[k]
    back, kwargs = from_layout(theirs, their_config, layout)
    assert torch.equal(back["model.layers.0.attn_res.pseudo_query"], torch.zeros(32))
    assert torch.equal(back["model.layers.0.attn_res.key_norm_weight"], torch.ones(32))
    # it has one source, so its weights never mattered
    assert torch.equal(logits(load(AttnResConfig(**kwargs), back), IDS), logits(model, IDS))


def test_only_layer0_attention_read_may_be_missing():
    config = tiny_config("block-aligned")
    theirs, their_config = to_layout(random_model(config).state_dict(), config, "fla")
    for missing in ("model.layers.1.attn_res_proj.weight", "model.layers.0.mlp_res_norm.weight"):
        partial = {k: v for k, v in theirs.items() if k != missing}
        with pytest.raises(ConvertError, match=f"^layout fla: missing {missing}$"):
            from_layout(partial, their_config, "fla")


# ----------------------------------------------------------------------------- no final aggregation in a checkpoint


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_missing_final_aggregation(layout):
    config = tiny_config("block-aligned", final=True)
    theirs, their_config = to_layout(random_model(config).state_dict(), config, layout)
    finals = [e.theirs for e in plan(config, layout) if e.ours[0].startswith("model.output_res.")]
    lacking = {k: v for k, v in theirs.items() if k not in finals}
    if layout == "attnres":  # our config says it has one: the weights must be there
        with pytest.raises(ConvertError, match="layout attnres: missing model.output_res"):
            from_layout(lacking, their_config, layout)
        their_config = {**their_config, "attn_res_final_aggregation": False}
        assert AttnResConfig(**from_layout(lacking, their_config, layout)[1]).attn_res_final_aggregation is False
        return
    summed, kwargs = from_layout(lacking, their_config, layout)  # default: the plain sum of all sources
    assert kwargs["attn_res_final_aggregation"] is False and not any(k.startswith("model.output_res") for k in summed)
    fresh, kwargs = from_layout(lacking, their_config, layout, missing_final="init")
    assert kwargs["attn_res_final_aggregation"] is True
    assert torch.equal(fresh["model.output_res.pseudo_query"], torch.zeros(32))
    assert torch.equal(fresh["model.output_res.key_norm_weight"], torch.ones(32))
    load(AttnResConfig(**kwargs), fresh)
    if len(finals) == 2:  # half a pair is a mismatch, not a missing aggregation
        with pytest.raises(ConvertError, match=f"layout {layout}: missing {finals[0]}"):
            from_layout({k: v for k, v in theirs.items() if k != finals[0]}, their_config, layout)


# ----------------------------------------------------------------------------- tied heads, legacy names


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tied_lm_head(layout):
    config = tiny_config("block-aligned", tie_word_embeddings=True)
    model = random_model(config)
    theirs, their_config = to_layout(model.state_dict(), config, layout)
    assert get_layout(layout).shared["lm_head.weight"] not in theirs
    back, kwargs = from_layout(theirs, their_config, layout)
    assert kwargs["tie_word_embeddings"] is True
    assert torch.equal(logits(load(AttnResConfig(**kwargs), back), IDS), logits(model, IDS))


def test_bf16_hub_weights_widen_exactly():
    """The K3 hub stores the AttnRes pairs in BF16; ours are fp32, and the widening is exact."""
    config = tiny_config("block-aligned")
    theirs, their_config = to_layout(random_model(config).state_dict(), config, "k3")
    res = [k for k in theirs if "_res_" in k]
    theirs = {k: v.bfloat16() if k in res else v for k, v in theirs.items()}
    back, _ = from_layout(theirs, their_config, "k3")
    q = back["model.layers.1.attn_res.pseudo_query"]
    assert q.dtype == torch.float32
    assert torch.equal(q, theirs["language_model.model.layers.1.self_attention_res_proj.weight"].float().reshape(-1))
    assert back["model.layers.1.self_attn.q_proj.weight"].dtype == torch.float32  # shared weights keep theirs


def test_old_stacked_names_export():
    config = tiny_config("block-aligned")
    sd = random_model(config).state_dict()
    stacked = {k: v for k, v in sd.items() if not k.endswith(("pseudo_query", "key_norm_weight"))}
    for name in ("pseudo_query", "key_norm_weight"):
        rows = [sd[f"model.layers.{i}.{kind}.{name}"] for i in range(3) for kind in ("attn_res", "mlp_res")]
        stacked[f"model.residual.{name}"] = torch.stack([*rows, sd[f"model.output_res.{name}"]])
    _same(to_layout(stacked, config, "fla")[0], to_layout(sd, config, "fla")[0])
