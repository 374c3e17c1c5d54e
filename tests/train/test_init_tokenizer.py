"""``attnres train --init DIR --set tokenizer=init``: fine-tune an upcycled model with its own tokenizer.

A tiny Llama with its own small tokenizer (eos ``<|im_end|>``, as SmolLM2-135M-Instruct's) is upcycled to
Block AttnRes; the run tokenizes the corpus with that tokenizer, starts from the upcycled weights and resumes.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from attnres.convert import upcycle
from attnres.data import Batches, load_tokenizer
from attnres.train import train
from attnres.train.checkpoint import CheckpointError
from attnres.train.config import ConfigError, load_config
from attnres.train.loop import prepare

from ..data.test_pretrained_tokenizer import EOS, own_tokenizer
from ..test_cli import assert_one_line_error, run
from .helpers import TINY, losses

STEPS = dict(max_steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1)


def upcycled(tmp_path, pad: int = 0, tokenizer: bool = True):
    """A tiny random Llama of TINY's shape with its own tokenizer, upcycled to Block (2 blocks); its dir."""
    src = tmp_path / "llama"
    tok = own_tokenizer(src) if tokenizer else None
    vocab = (len(tok) if tok is not None else 320) + pad
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(src)
    out = tmp_path / "up"
    upcycle(src, out, "block", blocks=2, progress=False)
    return out, tok


def test_an_upcycled_model_fine_tunes_with_its_own_tokenizer(tmp_path, tiny_cfg):
    d, tok = upcycled(tmp_path)
    cfg = tiny_cfg(init=str(d), tokenizer="init", **STEPS)
    assert (cfg.tokenizer, cfg.residual) == ("init", "block")
    data = prepare(cfg, progress=False)
    assert data.tokenizer.get_vocab() == tok.get_vocab() and data.tokenizer.eos_token == EOS
    assert data.manifest["tokenizer"]["source"] == str(d)
    ids = Batches(data.train, cfg.batch_size, cfg.seq_len, cfg.seed).get(0)
    assert int(ids.max()) >= 257  # BPE ids past the byte range: the corpus really is in the model's tokens
    model = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        first = model.train()(ids, labels=ids, use_cache=False).loss.item()
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    assert losses(out)[0][1] == pytest.approx(first, rel=1e-5)  # the upcycled weights on the model's tokens
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["tokenizer"] == "init" and info["model_config"]["vocab_size"] == len(tok)
    saved = load_tokenizer(out / "checkpoint")
    assert saved.get_vocab() == tok.get_vocab() and saved.eos_token == EOS
    train(tiny_cfg(init=str(d), tokenizer="init", **{**STEPS, "max_steps": 3}), out, resume=True, progress=False)
    assert [s for s, _ in losses(out)] == [1, 2, 3]


def test_tokenizer_init_needs_init(tiny_cfg, corpus, data_dir):
    with pytest.raises(ConfigError, match=r"^tokenizer=init tokenizes the corpus with the init model's own") as e:
        tiny_cfg(tokenizer="init")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="tokenizer must be one of bpe, byte, init"):
        tiny_cfg(tokenizer="gpt2")
    with pytest.raises(ConfigError, match="tokenizer=init"):  # compare / ablate arms build fresh models
        load_config("smoke", overrides={**TINY, "sources": [str(corpus)], "data_dir": str(data_dir),
                                        "tokenizer": "init"}, residuals=["standard", "block"])


def test_an_init_dir_without_a_tokenizer_is_one_line(tmp_path, capsys, tiny_yaml):
    d, _ = upcycled(tmp_path, tokenizer=False)
    assert not (d / "tokenizer.json").exists()
    rc, _, err = run(["train", "--config", tiny_yaml(tokenizer="init", **STEPS), "--init", d,
                      "--out", tmp_path / "o", "--no-progress"], capsys)
    assert_one_line_error(rc, err, "no tokenizer.json in")
    assert not (tmp_path / "o").exists()


def test_a_model_vocab_other_than_the_tokenizer_s_is_refused(tmp_path, tiny_cfg):
    d, tok = upcycled(tmp_path, pad=8)  # embedding padded past the tokenizer
    with pytest.raises(CheckpointError, match=f"has {len(tok)} tokens but the model's vocab_size is {len(tok) + 8}") \
            as e:
        train(tiny_cfg(init=str(d), tokenizer="init", **STEPS), tmp_path / "run", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "run.json").exists()
