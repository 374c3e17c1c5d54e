"""``attnres train --init DIR``: a fresh run that starts from a saved AttnResForCausalLM (weights and architecture)."""

from __future__ import annotations

import json

import pytest
import torch

from attnres import AttnResForCausalLM
from attnres.data import Batches
from attnres.train import train
from attnres.train.checkpoint import CheckpointError
from attnres.train.config import ConfigError, load_config
from attnres.train.loop import prepare

from ..test_cli import assert_one_line_error, run
from .helpers import TINY, losses


@pytest.fixture
def saved(tmp_path, tiny_cfg):
    """A tiny Block model (not the seed's init: every weight perturbed) and the byte tokenizer, saved with
    save_pretrained; ``(dir, cfg, data)``."""
    cfg = tiny_cfg(max_steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1)
    data = prepare(cfg, progress=False)
    torch.manual_seed(1234)
    model = AttnResForCausalLM(cfg.model_config(vocab_size=len(data.tokenizer)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = tmp_path / "init"
    model.save_pretrained(d)
    data.tokenizer.save_pretrained(d)
    return d, cfg, data, model


def test_a_run_with_init_starts_from_the_saved_weights_and_resumes(tmp_path, tiny_cfg, saved):
    d, cfg, data, model = saved
    ids = Batches(data.train, cfg.batch_size, cfg.seq_len, cfg.seed).get(0)
    with torch.no_grad():
        first = model.train()(ids, labels=ids, use_cache=False).loss.item()
    out = tmp_path / "run"
    train(tiny_cfg(max_steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1, init=str(d)), out, progress=False)
    assert losses(out)[0][1] == pytest.approx(first, rel=1e-5)
    fresh = tmp_path / "fresh"
    train(cfg, fresh, progress=False)  # the same config without init: another first loss
    assert losses(fresh)[0][1] != pytest.approx(first, rel=1e-3)
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["init"] == str(d.absolute())
    train(tiny_cfg(max_steps=3, eval_every=2, checkpoint_every=2, warmup_steps=1, init=str(d)), out, resume=True,
          progress=False)
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    # a run directory is an init too (its checkpoint/)
    again = tmp_path / "again"
    train(tiny_cfg(max_steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1, init=str(out)), again,
          progress=False)
    assert json.loads((again / "run.json").read_text())["config"]["init"] == str(out.absolute())


def test_model_keys_not_set_come_from_the_init_model(saved, corpus, data_dir):
    d, _, _, _ = saved
    # the smoke preset's hidden_size (64) and layout are not the user's: the saved model's (32) win
    keep = {k: v for k, v in TINY.items() if k not in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                       "num_key_value_heads", "attn_res_num_blocks")}
    cfg = load_config("smoke", overrides={**keep, "sources": [str(corpus)], "data_dir": str(data_dir), "init": str(d)})
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads, cfg.residual) == (32, 64, 1, "block")
    assert cfg.init == str(d.absolute())


@pytest.mark.parametrize("key, value", [("residual", "full"), ("hidden_size", 64), ("rope_theta", 500.0)])
def test_a_model_key_that_differs_from_the_init_model_is_refused(saved, tiny_cfg, key, value):
    d, _, _, _ = saved
    with pytest.raises(ConfigError, match=f"^init: {key}=") as e:
        tiny_cfg(init=str(d), **{key: value})
    assert "\n" not in str(e.value)


def test_init_errors_are_one_line(tmp_path, saved, tiny_cfg):
    with pytest.raises(ConfigError, match="does not exist"):
        tiny_cfg(init=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a model directory"):
        tiny_cfg(init=str(tmp_path / "empty"))
    d, _, _, _ = saved
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated") as e:
        train(tiny_cfg(max_steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1, init=str(d)),
              tmp_path / "run", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "run.json").exists()


def test_an_init_tokenizer_other_than_the_data_s_is_refused(tmp_path, saved, tiny_cfg):
    d, _, _, _ = saved
    tok = json.loads((d / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]  # same size, two tokens' ids swapped
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="is not the data's") as e:
        train(tiny_cfg(max_steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1, init=str(d)),
              tmp_path / "run", progress=False)
    assert "\n" not in str(e.value)


def test_init_is_refused_by_compare(saved, tiny_cfg):
    d, _, _, _ = saved
    with pytest.raises(ConfigError, match="compare and ablate"):
        load_config("smoke", overrides={**TINY, "init": str(d)}, residuals=["standard", "block"])


def test_cli_init_flag(tmp_path, capsys, tiny_yaml, saved):
    rc, _, err = run(["train", "--config", tiny_yaml(), "--init", tmp_path / "missing", "--out", tmp_path / "o",
                      "--no-progress"], capsys)
    assert_one_line_error(rc, err, "does not exist")
    d, _, _, _ = saved
    rc, _, err = run(["train", "--config", tiny_yaml(), "--init", d, "--residual", "full", "--out", tmp_path / "o",
                      "--no-progress"], capsys)
    assert_one_line_error(rc, err, "residual='full'")
