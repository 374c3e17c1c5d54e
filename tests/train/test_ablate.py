"""ablate: the arm parser, the t-interval, pairing with the baseline, resumability, an end-to-end run."""

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

import attnres.data
from attnres.train.ablate import (
    ARM_SHARED_KEYS,
    Arm,
    ablate,
    paired_delta,
    pairing_wrap,
    parse_arm,
    parse_arms,
    t_quantile,
)
from attnres.train.config import ConfigError, allowed_keys
from attnres.train.loop import TrainingInterrupted
from attnres.train.trainer import build_or_restore

TWO = dict(max_steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1)


# ----------------------------------------------------------------------------- the arm parser


@pytest.mark.parametrize(
    "text, scheme, overrides, spec",
    [
        ("block", "block", {}, "block"),
        (" block:attn_res_weights=sigmoid ", "block", {"attn_res_weights": "sigmoid"},
         "block:attn_res_weights=sigmoid"),
        ("full:attn_res_window=2", "full", {"attn_res_window": 2}, "full:attn_res_window=2"),
        ("full:attn_res_key_norm=false,lr=0.002", "full", {"attn_res_key_norm": False, "lr": 0.002},
         "full:attn_res_key_norm=false,lr=0.002"),
        ("denseformer", "denseformer", {}, "denseformer"),
        ("mhc:hyper_streams=4", "mhc", {"hyper_streams": 4}, "mhc:hyper_streams=4"),
    ],
)
def test_parse_arm_good(text, scheme, overrides, spec):
    arm = parse_arm(text)
    assert arm.scheme == scheme and dict(arm.overrides) == overrides and arm.spec == spec
    assert ":" not in arm.label and "," not in arm.label
    assert parse_arm(arm.spec) == arm  # the canonical spec parses back


@pytest.mark.parametrize(
    "text, names",
    [
        ("blok", ["'blok'", "schemes: standard, block, full"]),
        ("block:", ["nothing after ':'", "block takes: attn_res_query"]),
        ("block:attn_res_weights", ["'attn_res_weights' is not KEY=VALUE"]),
        ("block:attn_res_weights=cosine", ["attn_res_weights must be one of", "'cosine'"]),
        ("block:hyper_streams=4", ["'hyper_streams' is a key of residual=hc/mhc/mhc_lite, not of 'block'"]),
        ("standard:attn_res_window=2", ["not of 'standard'", "standard takes: no scheme keys"]),
        ("full:seq_len=64", ["'seq_len' is not a key an arm may set", "any arm: attn_res_block_size"]),
        ("full:lr=1e-3,lr=2e-3", ["'lr' given twice"]),
        ("full:attn_res_window=zero", ["attn_res_window must be an integer"]),
    ],
)
def test_parse_arm_bad(text, names):
    with pytest.raises(ConfigError) as e:
        parse_arm(text)
    msg = str(e.value)
    assert "\n" not in msg and repr(text) in msg
    for n in names:
        assert n in msg, msg


def test_parse_arms_baseline_first_and_duplicates():
    base, arms = parse_arms(["block", "standard", "full:attn_res_window=2"])
    assert base == Arm("standard") and [a.spec for a in arms] == ["standard", "block", "full:attn_res_window=2"]
    with pytest.raises(ConfigError, match="given twice"):
        parse_arms(["block", " block"])
    with pytest.raises(ConfigError, match="at least one arm"):
        parse_arms([])


def test_arm_shared_keys_are_config_keys():
    assert set(ARM_SHARED_KEYS) <= set(allowed_keys())


# ----------------------------------------------------------------------------- statistics


def test_t_interval_known_values():
    assert t_quantile(1)[0] == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(2)[0] == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(30)[0] == pytest.approx(2.042, abs=1e-3)
    assert t_quantile(60)[0] == pytest.approx(2.000, abs=2e-3)  # 2.0003
    # deltas -0.1, -0.2, -0.3: mean -0.2, sd 0.1, half-width 4.303 * 0.1 / sqrt(3) = 0.24844
    d = paired_delta([0.9, 0.8, 0.7], [1.0, 1.0, 1.0])
    assert d["mean"] == pytest.approx(-0.2) and d["sd"] == pytest.approx(0.1)
    assert d["half_width"] == pytest.approx(0.24844, abs=1e-4)
    one = paired_delta([0.9], [1.0])
    assert one["mean"] == pytest.approx(-0.1) and math.isnan(one["half_width"])


# ----------------------------------------------------------------------------- pairing


def test_pairing_shares_init_and_batches(tiny_cfg):
    # no registered scheme takes from the global RNG at init (tests/models/test_zoo_model.py), so a model
    # built at another seed stands in for one that would: without the pairing its shared weights differ
    base_cfg = tiny_cfg(residual="standard", seed=1, **TWO)
    arm_cfg = tiny_cfg(residual="depth_mha", seed=1, **TWO)
    shifted = tiny_cfg(residual="depth_mha", seed=2, **TWO)
    vocab = 300
    base = build_or_restore(base_cfg, vocab).model.state_dict()
    plain = build_or_restore(shifted, vocab).model.state_dict()
    arm = build_or_restore(shifted, vocab, wrap=pairing_wrap(base_cfg, vocab)).model.state_dict()
    shared = [k for k in base if k in arm and base[k].shape == arm[k].shape]
    assert len(shared) >= len(base) - 1
    assert not all(torch.equal(base[k], plain[k]) for k in shared)  # the unpaired arm differs
    assert all(torch.equal(base[k], arm[k]) for k in shared)
    assert any(k not in base for k in arm)  # the arm's own weights are kept
    # the same batches: the data order is the seed's, whatever the arm
    from attnres.data import Batches

    train = np.arange(5000) % vocab
    a = Batches(train, base_cfg.batch_size, base_cfg.seq_len, base_cfg.seed)
    b = Batches(train, arm_cfg.batch_size, arm_cfg.seq_len, arm_cfg.seed)
    assert all(torch.equal(torch.as_tensor(a.get(i)), torch.as_tensor(b.get(i))) for i in range(3))


# ----------------------------------------------------------------------------- end to end, resumability


@pytest.fixture
def seen_batches(monkeypatch):
    """Every training batch fetched, in order (as bytes)."""
    get, seen = attnres.data.Batches.get, []

    def record(self, step):
        x = get(self, step)
        seen.append(torch.as_tensor(x).numpy().tobytes())
        return x

    monkeypatch.setattr(attnres.data.Batches, "get", record)
    return seen


def test_ablate_end_to_end_and_resume(tmp_path, tiny_cfg, seen_batches):
    out = tmp_path / "abl"
    cfg = tiny_cfg(**TWO)
    s = ablate(cfg, out, ["full:attn_res_window=1"], seeds=[0, 1], preset="smoke", progress=False, argv=[])
    assert [a["arm"] for a in s["arms"]] == ["standard", "full:attn_res_window=1"]
    # runs: s0 standard, s0 full, s1 standard, s1 full; 2 steps each, same batches within a seed
    assert len(seen_batches) == 8
    runs = [seen_batches[i:i + 2] for i in range(0, 8, 2)]
    assert runs[0] == runs[1] and runs[2] == runs[3] and runs[0] != runs[2]
    for name in ("report.md", "summary.json", "ablate.png", "flops.json"):
        assert (out / name).is_file(), name
    for d in ("standard-s0", "standard-s1", "full+attn_res_window=1-s0", "full+attn_res_window=1-s1"):
        assert (out / d / "result.json").is_file(), d
    pairing = json.loads((out / "full+attn_res_window=1-s1" / "pairing.json").read_text())
    assert pairing["shared"] > 0 and pairing["baseline"] == "standard"
    summary = json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)  # no NaN
    for a in summary["arms"]:
        assert a["params"] > 0 and math.isfinite(a["flops_per_token"]) and a["flops_per_token"] > 0
        assert all(math.isfinite(v) for v in a["val_loss"]) and math.isfinite(a["wall_time_mean"])
    d = summary["arms"][1]["delta"]
    assert d["n"] == 2 and math.isfinite(d["mean"]) and math.isfinite(d["half_width"])
    assert summary["arms"][1]["params"] > summary["arms"][0]["params"]
    report = (out / "report.md").read_text()
    assert "| arm |" in report and "full:attn_res_window=1" in report and "±" in report
    assert "FLOPs/token" in report and "![val loss per arm](ablate.png)" in report

    # a second invocation (one more arm) trains only what is missing
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    seen_batches.clear()
    s2 = ablate(cfg, out, ["full:attn_res_window=1", "denseformer"], seeds=[0, 1], preset="smoke",
                progress=False, argv=[])
    assert len(seen_batches) == 4  # denseformer s0 and s1 only
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert [a["arm"] for a in s2["arms"]] == ["standard", "full:attn_res_window=1", "denseformer"]
    assert s2["arms"][1]["val_loss"] == s["arms"][1]["val_loss"]

    # runs paired with another baseline are not reused
    with pytest.raises(ConfigError, match=r"not paired with the baseline 'full:attn_res_window=1': "
                       r"standard-s0 \(initialised from its own init\)"):
        ablate(cfg, out, ["standard"], baseline="full:attn_res_window=1", seeds=[0], progress=False, argv=[])
    # another shared config for the same runs is refused, not silently reused
    with pytest.raises(ConfigError, match="another config"):
        ablate(tiny_cfg(**{**TWO, "lr": 0.003}), out, ["denseformer"], seeds=[0], progress=False, argv=[])


def test_ablate_unfinished_run_needs_resume(tmp_path, tiny_cfg, monkeypatch):
    out = tmp_path / "abl"
    cfg = tiny_cfg(max_steps=4, eval_every=2, checkpoint_every=2, warmup_steps=1)
    get, fired = attnres.data.Batches.get, []

    def get_and_interrupt(self, step):
        if step == 2 and not fired:  # SIGINT during step 3: it completes, a checkpoint is saved
            fired.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return get(self, step)

    monkeypatch.setattr(attnres.data.Batches, "get", get_and_interrupt)
    with pytest.raises(TrainingInterrupted):
        ablate(cfg, out, ["block"], seeds=[0], progress=False, argv=[])
    monkeypatch.undo()
    assert not (out / "block-s0").exists()
    with pytest.raises(ConfigError, match="unfinished runs .*standard-s0.*--resume"):
        ablate(cfg, out, ["block"], seeds=[0], progress=False, argv=[])
    s = ablate(cfg, out, ["block"], seeds=[0], resume=True, progress=False, argv=[])
    assert [r["steps"] for r in s["runs"]] == [4, 4]
    assert math.isfinite(s["arms"][1]["delta"]["mean"])


# ----------------------------------------------------------------------------- the command


def test_cli_ablate_help_and_errors(capsys):
    from attnres_cli import main as light_main

    with pytest.raises(SystemExit) as e:
        light_main(["ablate", "--help"])
    assert e.value.code == 0 and "SCHEME[:KEY=VALUE,...]" in capsys.readouterr().out
    from attnres.cli import main

    assert main(["ablate", "block:hyper_streams=4", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnres: error: arm 'block:hyper_streams=4'") and "\n" not in err
    assert main(["ablate", "block", "--set", "seed=3", "--no-progress"]) == 1
    assert "do not --set it" in capsys.readouterr().err


def test_cli_ablate_runs(tmp_path, tiny_yaml, capsys):
    from attnres.cli import main

    out = tmp_path / "abl"
    cfg = tiny_yaml(max_steps=2, eval_every=2, checkpoint_every=2, warmup_steps=1)
    args = ["ablate", "block", "--preset", "smoke", "--config", str(cfg), "--seeds", "1", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [a["arm"] for a in summary["arms"]] == ["standard", "block"] and summary["seeds"] == [0]
    assert "attnres ablate block" in (out / "report.md").read_text()


def test_a_diverging_arm_is_recorded_not_fatal(tmp_path, tiny_cfg, monkeypatch):
    from attnres.train.trainer import NonFiniteLoss, Trainer

    check = Trainer.check_finite

    def blow_up_block(self, loss, grad_norm):
        if self.cfg.residual == "block" and self.state.step == 1:
            raise NonFiniteLoss("non-finite training loss (nan) at step 2")
        return check(self, loss, grad_norm)

    monkeypatch.setattr(Trainer, "check_finite", blow_up_block)
    out, cfg = tmp_path / "abl", tiny_cfg(**TWO)
    s = ablate(cfg, out, ["block"], seeds=[0], progress=False, argv=[])
    block = s["arms"][1]
    assert block["diverged"] == [0] and block["val_loss"] == [None] and block["delta"]["n"] == 0
    assert (out / "block-s0" / "diverged.json").is_file()
    assert "(1/1 diverged)" in (out / "report.md").read_text()
    monkeypatch.undo()
    again = ablate(cfg, out, ["block"], seeds=[0], progress=False, argv=[])  # kept, not retrained
    assert again["arms"][1]["diverged"] == [0]
    json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
