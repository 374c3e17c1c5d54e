"""Checkpoints: a crash mid-save never loses the previous one; state round-trips."""

import os
import random
import shutil
import stat

import numpy as np
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
    state = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


# ----------------------------------------------------------------------------- safe loading


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, data_dir):
    """A real run's checkpoint (optimizer/scheduler/RNG states); tests copy it before changing it."""
    from attnres.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_config(
        "smoke",
        overrides={**TINY, "sources": [str(corpus)], "data_dir": str(data_dir), "max_steps": 4},
    )
    train(cfg, out, progress=False)
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_a_real_trainer_state_loads_with_weights_only(trained):
    path = find_checkpoint(trained) / "trainer_state.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)  # no pickled objects in it
    assert state["step"] == 4 and {"torch", "numpy", "python"} <= set(state["rng"])
    assert ck.load_trainer_state(find_checkpoint(trained))["step"] == 4


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    np.random.seed(123)
    random.seed(456)
    random.gauss(0, 1)  # a cached gaussian in the python state
    np.random.standard_normal()  # ...and in numpy's
    torch.save({"rng": ck.rng_state()}, tmp_path / "s.pt")
    a = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal(), random.gauss(0, 1))
    ck.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal(), random.gauss(0, 1))
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2:] == b[2:]


class _TouchOnUnpickle:
    """Unpickling this creates ``path``: the side effect a safe load must never let happen."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_state_file_carrying_a_pickled_object_is_refused_and_never_run(tmp_path):
    _save(tmp_path, _model(0), 1)
    state_file = tmp_path / "checkpoint" / "trainer_state.pt"
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _TouchOnUnpickle(marker)}, state_file)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_trainer_state(find_checkpoint(tmp_path))
    assert str(state_file) in str(e.value) and "unsafe" in str(e.value)
    assert not marker.exists()  # nothing from the file ran
    torch.load(state_file, weights_only=False)  # the payload is real: an unsafe load does run it
    assert marker.exists()


def test_an_old_format_state_file_is_refused_naming_the_file(tmp_path):
    _save(tmp_path, _model(0), 1)
    state_file = tmp_path / "checkpoint" / "trainer_state.pt"
    old_rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"step": 1, "rng": old_rng}, state_file)  # what attnres wrote before (numpy arrays)
    with pytest.raises(ck.CheckpointError, match="old or unsafe format") as e:
        ck.load_trainer_state(find_checkpoint(tmp_path))
    assert str(state_file) in str(e.value)


@pytest.mark.parametrize("content", [b"", b"not a torch file" * 8, "truncate"])
def test_a_corrupt_state_file_names_the_file(tmp_path, content):
    _save(tmp_path, _model(0), 1)
    state_file = tmp_path / "checkpoint" / "trainer_state.pt"
    if content == "truncate":
        content = state_file.read_bytes()[:-20]
    state_file.write_bytes(content)
    with pytest.raises(ck.CheckpointError, match="corrupt or truncated") as e:
        ck.load_trainer_state(find_checkpoint(tmp_path))
    assert str(state_file) in str(e.value)


# ----------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_every_checkpoint_file_gets_the_umask_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = _save(tmp_path, _model(0), 1)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir() if p.is_file()}
    assert "model.safetensors" in modes  # safetensors alone writes it as 0600
    assert modes == dict.fromkeys(modes, mode)


# ----------------------------------------------------------------------------- corrupt weights


def _truncate_weights(ckpt):
    weights = ckpt / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return weights


def test_load_pretrained_on_truncated_weights_names_the_file(tmp_path):
    weights = _truncate_weights(_save(tmp_path, _model(0), 1))
    with pytest.raises(ck.CheckpointError, match="corrupt or truncated") as e:
        load_pretrained(tmp_path)
    assert str(weights) in str(e.value)


def test_resume_on_truncated_weights_is_a_one_line_error_naming_the_file(trained, tmp_path, capsys):
    from attnres.cli import main

    out = _copy(trained, tmp_path)
    weights = _truncate_weights(find_checkpoint(out))
    # --max-steps past the checkpoint's step: resuming a finished run stops before loading weights
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "8", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "SafetensorError" not in err
    assert f"{weights} is corrupt or truncated" in err
