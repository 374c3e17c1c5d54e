"""Checkpoints: a crash mid-save never loses the previous one; state round-trips."""

import os

import pytest
import torch

from attnres import AttnResForCausalLM
from attnres.data import byte_tokenizer
from attnres.train import checkpoint as ck
from attnres.train import find_checkpoint, load_config, load_pretrained

from .helpers import TINY


def _model(seed):
    torch.manual_seed(seed)
    return AttnResForCausalLM(load_config("smoke", overrides=TINY).model_config(vocab_size=257))


def _save(out, model, step):
    return ck.save_checkpoint(out, model, byte_tokenizer(), {"step": step}, {"seq_len": 32})


def _step(out):
    return ck.load_trainer_state(find_checkpoint(out))["step"]


def test_save_writes_model_tokenizer_and_state(tmp_path):
    model = _model(0)
    path = _save(tmp_path, model, 3)
    assert path == tmp_path / "checkpoint"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "train_config.json"):
        assert (path / f).is_file(), f
    assert not (tmp_path / "checkpoint.tmp").exists() and not (tmp_path / "checkpoint.old").exists()
    loaded, tok, train_cfg = load_pretrained(tmp_path)
    assert len(tok) == 257 and train_cfg == {"seq_len": 32}
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_crash_after_temp_dir_is_written_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = _model(0)
    _save(tmp_path, first, 1)

    def crash(out, tmp):
        assert (tmp / "trainer_state.pt").exists()  # the new one is fully written...
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(ck, "_commit", crash)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, _model(1), 2)
    assert _step(tmp_path) == 1  # ...but the previous one is what loads
    loaded, _, _ = load_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, first.lm_head.weight)
    assert not (tmp_path / "checkpoint.tmp").exists()  # find_checkpoint cleaned the leftover


def test_crash_between_the_two_renames_recovers_the_old_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, _model(0), 1)
    real_replace = os.replace
    calls = []

    def replace_then_crash(src, dst):
        calls.append((src, dst))
        real_replace(src, dst)
        if str(dst).endswith("checkpoint.old"):
            raise OSError("simulated crash after moving the old checkpoint aside")

    monkeypatch.setattr(ck.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, _model(1), 2)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert not (tmp_path / "checkpoint").exists() and (tmp_path / "checkpoint.old").exists()
    assert _step(tmp_path) == 1  # recovered from checkpoint.old
    assert (tmp_path / "checkpoint").exists() and not (tmp_path / "checkpoint.old").exists()


def test_a_later_save_replaces_the_checkpoint(tmp_path):
    _save(tmp_path, _model(0), 1)
    _save(tmp_path, _model(1), 2)
    assert _step(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]
