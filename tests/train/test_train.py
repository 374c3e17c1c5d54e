"""The training loop: exact resume after kills, clean stops on signals and non-finite losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import attnres.data
from attnres import AttnResForCausalLM
from attnres.cli import main
from attnres.train import find_checkpoint, read_metrics, train
from attnres.train.checkpoint import load_trainer_state

from .._stderr import attnres_lines
from .helpers import TINY, losses

SLOW_CLI = Path(__file__).with_name("slow_cli.py")
RUN = dict(max_steps=12, checkpoint_every=4, eval_every=4)


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory, corpus, data_dir) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"preset": "smoke", **TINY, **RUN, "sources": [str(corpus)], "data_dir": str(data_dir)}
        )
    )
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_yaml) -> Path:
    """The uninterrupted run every interrupted one must match."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "--config", str(run_yaml), "--out", str(out), "--no-progress"]) == 0
    return out


def _train_rows_are_contiguous(out: Path, n: int) -> None:
    assert [s for s, _ in losses(out)] == list(range(1, n + 1))


def _final_eval(out: Path) -> dict:
    return [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r][-1]


def _ckpt_step(out: Path) -> int:
    return load_trainer_state(find_checkpoint(out))["step"]


def test_run_writes_metrics_run_info_checkpoint_and_result(reference):
    rows = read_metrics(reference / "metrics.jsonl")
    train_rows = [r for r in rows if "train_loss" in r]
    assert set(train_rows[0]) >= {"step", "train_loss", "lr", "tokens", "step_time"}
    assert train_rows[-1]["tokens"] == 12 * TINY["batch_size"] * TINY["seq_len"]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12] and all({"ppl", "bpb"} <= set(r) for r in evals)
    run = json.loads((reference / "run.json").read_text())
    assert run["config"]["max_steps"] == 12 and run["seeds"]["seed"] == 0
    assert (
        {"python", "torch", "transformers", "attnres"} <= set(run["versions"])
        and "argv" in run
        and "git" in run
    )
    result = json.loads((reference / "result.json").read_text())
    assert result["val_loss"] == evals[-1]["val_loss"] and result["steps"] == 12
    assert _ckpt_step(reference) == 12


def test_crash_after_a_checkpoint_then_resume_ends_on_the_same_losses(
    tmp_path, run_yaml, reference, monkeypatch
):
    out = tmp_path / "run"
    get = attnres.data.Batches.get

    def crash_at_step_7(self, step):
        if step == 6:  # 0-based batch index of step 7: after the step-4 checkpoint, before step 8's
            raise RuntimeError("simulated crash")
        return get(self, step)

    monkeypatch.setattr(attnres.data.Batches, "get", crash_at_step_7)
    with pytest.raises(RuntimeError, match="simulated crash"):  # not a user error: the traceback shows
        main(["train", "--config", str(run_yaml), "--out", str(out), "--no-progress"])
    assert _ckpt_step(out) == 4 and max(s for s, _ in losses(out)) == 6
    monkeypatch.setattr(attnres.data.Batches, "get", get)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    _train_rows_are_contiguous(out, 12)  # rows 5-6 of the crashed attempt were cut
    assert losses(out) == losses(reference)
    assert _final_eval(out)["val_loss"] == _final_eval(reference)["val_loss"]
    assert len(json.loads((out / "run.json").read_text())["resumes"]) == 1


def _wait_for_step(proc, out: Path, step: int, timeout: float = 180.0) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [s for s, _ in losses(out)] if (out / "metrics.jsonl").exists() else []
        if done and done[-1] >= step:
            return done[-1]
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout}s")


def _spawn(args, delay=0.25):
    return subprocess.Popen(
        [sys.executable, str(SLOW_CLI), str(delay), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )


def test_sigkill_after_a_checkpoint_then_resume_ends_on_the_same_losses(tmp_path, run_yaml, reference):
    out = tmp_path / "run"
    proc = _spawn(["train", "--config", str(run_yaml), "--out", str(out), "--no-progress"])
    _wait_for_step(proc, out, 6)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert _ckpt_step(out) in (4, 8)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    _train_rows_are_contiguous(out, 12)
    assert losses(out) == losses(reference)
    assert _final_eval(out)["val_loss"] == _final_eval(reference)["val_loss"]


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, run_yaml, reference):
    out = tmp_path / "run"
    proc = _spawn(["train", "--config", str(run_yaml), "--out", str(out), "--no-progress"])
    _wait_for_step(proc, out, 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    (err,) = attnres_lines(proc.stderr.read())
    assert "SIGTERM" in err and "--resume" in err
    last = max(s for s, _ in losses(out))
    assert last < 12 and _ckpt_step(out) == last  # stopped early, checkpoint at the last finished step
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert losses(out) == losses(reference)


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path, run_yaml, monkeypatch, capsys):
    out = tmp_path / "run"
    get = attnres.data.Batches.get

    def interrupt_at_step_3(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # our handler only sets a flag: step 3 still completes
        return get(self, step)

    monkeypatch.setattr(attnres.data.Batches, "get", interrupt_at_step_3)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
    assert main(["train", "--config", str(run_yaml), "--out", str(out), "--no-progress"]) == 130
    assert "SIGINT at step 3" in capsys.readouterr().err
    assert _ckpt_step(out) == 3 and max(s for s, _ in losses(out)) == 3
    assert signal.getsignal(signal.SIGINT) == before  # handler restored


def test_nonfinite_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(
    tmp_path, run_yaml, monkeypatch, capsys
):
    out = tmp_path / "run"
    forward = AttnResForCausalLM.forward
    calls = {"train": 0}

    def nan_from_step_6(self, *args, **kwargs):
        result = forward(self, *args, **kwargs)
        if self.training and kwargs.get("labels") is not None:
            calls["train"] += 1
            if calls["train"] >= 6:
                result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(AttnResForCausalLM, "forward", nan_from_step_6)
    assert main(["train", "--config", str(run_yaml), "--out", str(out), "--no-progress"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("attnres: error: non-finite training loss") and "step 6" in err[0]
    )
    assert _ckpt_step(out) == 4
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    assert not (out / "result.json").exists()
    monkeypatch.setattr(AttnResForCausalLM, "forward", forward)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0  # the good checkpoint resumes
    assert before != (out / "checkpoint" / "model.safetensors").read_bytes()


def test_exploding_lr_stops_cleanly(tmp_path, run_yaml, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--config",
            str(run_yaml),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "lr=1e30",
            "--set",
            "grad_clip=0",
            "--set",
            "warmup_steps=0",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and "non-finite" in err[0]
    assert find_checkpoint(out) is None
    assert all(
        r["train_loss"] == r["train_loss"] for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r
    )


def test_a_fresh_run_never_overwrites_a_finished_one(reference, run_yaml, capsys):
    before = (reference / "metrics.jsonl").read_bytes()
    assert main(["train", "--config", str(run_yaml), "--out", str(reference), "--no-progress"]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (reference / "metrics.jsonl").read_bytes() == before


def test_resume_with_a_different_model_config_is_refused(reference, run_yaml, capsys):
    rc = main(
        [
            "train",
            "--config",
            str(run_yaml),
            "--out",
            str(reference),
            "--resume",
            "--no-progress",
            "--set",
            "hidden_size=64",
        ]
    )
    assert rc == 1 and "cannot resume with a different config: hidden_size" in capsys.readouterr().err


def test_resume_can_extend_a_finished_run(tmp_path, reference):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "14", "--no-progress"]) == 0
    _train_rows_are_contiguous(out, 14)
    assert losses(out)[:12] == losses(reference)


def test_arms_start_from_identical_shared_weights(tiny_cfg):
    models = {}
    for residual in ("standard", "block", "full"):
        torch.manual_seed(tiny_cfg().seed)
        models[residual] = AttnResForCausalLM(tiny_cfg(residual=residual).model_config(vocab_size=257))
    ref = models["standard"].state_dict()
    for residual in ("block", "full"):
        sd = models[residual].state_dict()
        reads = [f"model.layers.{i}.{r}" for i in range(tiny_cfg().num_hidden_layers) for r in ("attn_res", "mlp_res")]
        assert set(sd) - set(ref) == {f"{r}.{p}" for r in [*reads, "model.output_res"]
                                      for p in ("pseudo_query", "key_norm_weight")}
        assert all(torch.equal(ref[k], sd[k]) for k in ref)


def test_probe_rows_are_recorded_at_evaluations(tmp_path, tiny_cfg):
    summary = train(tiny_cfg(probes=True, max_steps=4, residual="full"), tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    probes = [r for r in rows if "probes" in r]
    assert [r["step"] for r in probes] == [4]
    assert {"output_rms", "grad_norm", "depth_weights"} <= set(probes[0]["probes"])
    assert summary["val_loss"] is not None and summary["tokens_per_s"] > 0


@pytest.mark.parametrize("residual", ["standard", "block"])
def test_bf16_autocast_trains(tmp_path, tiny_cfg, residual):
    summary = train(
        tiny_cfg(bf16=True, max_steps=2, eval_every=2, residual=residual), tmp_path / "run", progress=False
    )
    assert summary["val_loss"] < 10
    assert all(
        p.dtype == torch.float32
        for p in AttnResForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint").parameters()
    )


def test_muon_and_wsd_train(tmp_path, tiny_cfg):
    summary = train(tiny_cfg(optimizer="muon", schedule="wsd", max_steps=4), tmp_path / "run", progress=False)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert len(lrs) == 4 and summary["train_loss"] < 6


def test_num_threads_applies_to_the_run_only(tmp_path, tiny_cfg):
    before = torch.get_num_threads()
    train(tiny_cfg(num_threads=1, max_steps=2, eval_every=2), tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["versions"]["torch_threads"] == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("residual", ["standard", "block", "full"])
def test_activation_checkpointing_trains_to_the_same_losses(tmp_path, tiny_cfg, residual, monkeypatch):
    from attnres.models.modeling import DecoderLayer

    bodies = []
    real = DecoderLayer._sublayers
    monkeypatch.setattr(DecoderLayer, "_sublayers", lambda *a, **k: bodies.append(1) or real(*a, **k))
    runs, calls = {}, {}
    for on in (False, True):
        bodies.clear()
        cfg = tiny_cfg(residual=residual, max_steps=3, eval_every=3, probes=False, activation_checkpointing=on)
        train(cfg, tmp_path / str(on), progress=False)
        calls[on] = len(bodies)
        rows = read_metrics(tmp_path / str(on) / "metrics.jsonl")
        runs[on] = [(r.get("train_loss"), r.get("val_loss")) for r in rows if "train_loss" in r or "val_loss" in r]
    layers = tiny_cfg().num_hidden_layers
    assert calls[True] - calls[False] == 3 * layers  # each training step recomputed every layer once
    assert runs[True] == runs[False]
