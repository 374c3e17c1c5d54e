"""Checkpoints saved before the residual-state redesign (stacked ``model.residual.*``) still load, exactly."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from attnres import AttnResForCausalLM
from attnres.models.legacy import convert_legacy_state_dict
from attnres.train.checkpoint import load_model

FIXTURES = Path(__file__).with_name("fixtures")
KINDS = ["legacy-block", "legacy-full"]


def expected(kind):
    return torch.load(FIXTURES / kind / "expected.pt", weights_only=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loader", [AttnResForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained,
                                    load_model])
def test_old_checkpoint_gives_the_logits_the_old_code_computed(kind, loader):
    model = loader(FIXTURES / kind).eval()
    assert not any("residual" in name for name in model.state_dict())
    want = expected(kind)
    with torch.no_grad():
        torch.testing.assert_close(model(want["input_ids"], use_cache=False).logits, want["logits"],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_old_state_dict_loads_strictly_into_a_new_model(kind):
    old = load_file(FIXTURES / kind / "model.safetensors")
    model = AttnResForCausalLM.from_pretrained(FIXTURES / kind)
    fresh = AttnResForCausalLM(model.config)
    fresh.load_state_dict(old, strict=False)  # the stacked names are converted, nothing is left over
    missing, unexpected = fresh.load_state_dict(old, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    for name, p in model.state_dict().items():
        assert torch.equal(p, fresh.state_dict()[name]), name


def test_conversion_places_each_row_at_its_read_point():
    rows = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)  # 2 layers + the final aggregation
    sd = {"model.residual.pseudo_query": rows, "model.residual.key_norm_weight": rows + 100}
    assert convert_legacy_state_dict(sd, "model.")
    assert torch.equal(sd["model.layers.0.attn_res.pseudo_query"], rows[0])
    assert torch.equal(sd["model.layers.0.mlp_res.pseudo_query"], rows[1])
    assert torch.equal(sd["model.layers.1.mlp_res.key_norm_weight"], rows[3] + 100)
    assert torch.equal(sd["model.output_res.pseudo_query"], rows[4])
    assert not any("residual" in k for k in sd)
    assert not convert_legacy_state_dict({"model.layers.0.attn_res.pseudo_query": rows[0]}, "model.")


def test_old_checkpoint_saves_in_the_new_layout(tmp_path):
    model = AttnResForCausalLM.from_pretrained(FIXTURES / "legacy-block")
    model.save_pretrained(tmp_path / "new")
    names = set(load_file(tmp_path / "new" / "model.safetensors"))
    assert "model.layers.1.mlp_res.pseudo_query" in names and not any("residual" in n for n in names)
    shutil.rmtree(tmp_path / "new")
