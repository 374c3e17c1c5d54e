"""Importing a layout reproduces that layout's forward: a small model built in the foreign naming (every
tensor drawn afresh, not exported by us) runs through an independent forward in that stack's conventions
(``_foreign.py``), and our model loaded from the imported dict gives the same logits."""

import pytest
import torch

from attnres import AttnResConfig
from attnres.convert import from_layout, plan, to_layout

from ._foreign import FORWARDS
from ._tiny import CASES, expressible, load, logits, tiny_config

IDS = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
PAIRS = [(lay, case, final) for lay in FORWARDS for case in CASES for final in (True, False)
         if expressible(lay, case) and (case != "standard" or (lay == "fla" and final))]


def foreign_model(layout: str, config: AttnResConfig, seed: int = 0) -> tuple[dict, dict]:
    """A random fp64 state dict with ``layout``'s names and shapes, and its config."""
    torch.manual_seed(seed)
    names, foreign_config = to_layout(_shapes(config), config, layout)
    sd = {}
    for name, t in names.items():
        if t.dim() == 2 and t.shape[0] > 1:  # a matrix: weights scaled to keep activations O(1)
            sd[name] = torch.randn(t.shape, dtype=torch.float64) / t.shape[1] ** 0.5
        elif name.endswith(("proj.weight", "score.weight")) and "res" in name:  # a pseudo-query or fused score
            sd[name] = 0.7 * torch.randn(t.shape, dtype=torch.float64)
        else:  # a norm gain
            sd[name] = 1 + 0.3 * torch.randn(t.shape, dtype=torch.float64)
    return sd, foreign_config


def _shapes(config: AttnResConfig) -> dict:
    return {k: torch.empty(e.shape) for e in plan(config, "attnres") for k in e.ours}


@pytest.mark.parametrize("layout,case,final", PAIRS)
def test_imported_model_matches_the_foreign_forward(layout, case, final):
    config = tiny_config(case, final)
    theirs, their_config = foreign_model(layout, config)
    want = FORWARDS[layout](theirs, their_config, IDS)
    ours, kwargs = from_layout(theirs, their_config, layout)
    got = logits(load(AttnResConfig(**kwargs), ours, torch.float64), IDS)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert want.std() > 0.1  # not a degenerate model


@pytest.mark.parametrize("layout", list(FORWARDS))
def test_a_wrong_map_is_caught_by_the_foreign_forward(layout):
    """The check has teeth: swapping two layers' attention queries changes the foreign logits."""
    config = tiny_config("block-aligned")
    theirs, their_config = foreign_model(layout, config)
    ours, kwargs = from_layout(theirs, their_config, layout)
    swapped = dict(ours)
    swapped["model.layers.1.attn_res.pseudo_query"] = ours["model.layers.2.attn_res.pseudo_query"]
    swapped["model.layers.2.attn_res.pseudo_query"] = ours["model.layers.1.attn_res.pseudo_query"]
    got = logits(load(AttnResConfig(**kwargs), swapped, torch.float64), IDS)
    assert not torch.allclose(got, FORWARDS[layout](theirs, their_config, IDS), rtol=1e-6, atol=1e-6)


def test_gguf_qk_rows_match_transformers_gguf_loader():
    """Our GGUF q / k rows are llama.cpp's permutation: transformers' own GGUF loader undoes it."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    config = tiny_config("block-aligned")
    sd = {k: torch.randn(v.shape) for k, v in _shapes(config).items()}
    theirs, _ = to_layout(sd, config, "gguf")
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for gguf, hf in (("blk.1.attn_q.weight", "q_proj"), ("blk.1.attn_k.weight", "k_proj")):
        undone = proc.process(theirs[gguf].numpy(), gguf).weights
        assert torch.equal(torch.from_numpy(undone), sd[f"model.layers.1.self_attn.{hf}.weight"])
        assert not torch.equal(theirs[gguf], sd[f"model.layers.1.self_attn.{hf}.weight"])
