"""``torchrun --nproc_per_node=2 -m attnres train`` end to end (gloo, CPU, fp32): the single-process
losses, rank 0 alone writing, a killed rank stopping the job and ``--resume`` losing nothing, and
checkpoints moving between 1 and 2 processes (DDP -> one process, one process -> FSDP2)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import attnres.data
from attnres.cli import main
from attnres.train import find_checkpoint, read_metrics
from attnres.train.checkpoint import load_trainer_state

from ..train.helpers import TINY, losses, write_corpus
from .launch import torchrun

FAULTY = str(Path(__file__).with_name("faulty_cli.py"))
RUN = dict(max_steps=6, checkpoint_every=2, eval_every=3)
# fp32: the two processes' losses are means of half-batches, so they differ from one process's in the
# last bits and AdamW carries that on: measured <= 2e-7 relative over these 6 steps
FP32 = dict(rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    values = {"preset": "smoke", **TINY, **RUN, "sources": [str(write_corpus(root / "corpus"))],
              "data_dir": str(root / "data")}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, run_yaml) -> Path:
    """One process, uninterrupted (it also prepares the data the jobs then find cached)."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", "--config", str(run_yaml), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, run_yaml, single):
    """Two processes (DDP), uninterrupted, through ``python -m attnres``; progress on (plain lines)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun(["-m", "attnres", "train", "--config", str(run_yaml), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    return out, proc


def _vals(out: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]


def _close(got, want) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    torch.testing.assert_close([x for _, x in got], [x for _, x in want], **FP32)


def test_two_processes_give_the_single_process_losses_and_rank_0_alone_writes(single, ddp):
    out, proc = ddp
    _close(losses(out), losses(single))
    torch.testing.assert_close(_vals(out), _vals(single), **FP32)
    assert proc.stdout.count(f"-> {out}") == 1  # the summary line, once
    assert proc.stderr.count("step 3/6 val_loss") == 1  # the progress lines, once
    ckpt = find_checkpoint(out)
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    state = load_trainer_state(ckpt)
    assert state["world_size"] == 2 and state["step"] == 6 and "optimizers" not in state
    assert json.loads((out / "result.json").read_text())["steps"] == 6


def test_a_killed_rank_stops_the_job_and_resume_loses_nothing(tmp_path, run_yaml, ddp):
    out = tmp_path / "run"
    kill = {"ATTNRES_TEST_KILL_RANK": "1", "ATTNRES_TEST_KILL_BATCH": "4"}  # step 5, after step 4's checkpoint
    proc = torchrun([FAULTY, "train", "--config", str(run_yaml), "--out", str(out), "--no-progress"], env=kill)
    assert proc.returncode != 0
    assert "rank      : 1" in proc.stderr and "Signal 9 (SIGKILL)" in proc.stderr  # torchrun's report
    assert load_trainer_state(find_checkpoint(out))["step"] == 4

    moved = tmp_path / "moved"  # the 2-process checkpoint resumes on one process
    shutil.copytree(out, moved)
    assert main(["train", "--out", str(moved), "--resume", "--no-progress"]) == 0
    _close(losses(moved), losses(ddp[0]))

    proc = torchrun(["-m", "attnres", "train", "--out", str(out), "--resume", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert losses(out) == losses(ddp[0])  # the same job resumed: bitwise
    assert _vals(out) == _vals(ddp[0])


def test_a_single_process_checkpoint_resumes_on_two_fsdp_processes_and_exports(tmp_path, run_yaml, single,
                                                                                monkeypatch, capsys):
    out = tmp_path / "run"
    get = attnres.data.Batches.get

    def crash_at_step_5(self, index):
        if index == 4:
            raise RuntimeError("simulated crash")
        return get(self, index)

    monkeypatch.setattr(attnres.data.Batches, "get", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", "--config", str(run_yaml), "--out", str(out), "--no-progress"])
    monkeypatch.setattr(attnres.data.Batches, "get", get)
    proc = torchrun(["-m", "attnres", "train", "--out", str(out), "--resume", "--set", "parallel=fsdp",
                     "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    _close(losses(out), losses(single))
    assert (find_checkpoint(out) / "dcp" / ".metadata").is_file()

    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / "model.safetensors").is_file()
    text = str(tmp_path / "eval.txt")
    Path(text).write_text("the state of the world and the people in it\n" * 20)
    capsys.readouterr()
    for ckpt in (out, tmp_path / "plain"):  # the sharded checkpoint and its export evaluate alike
        assert main(["eval", "--checkpoint", str(ckpt), "--text", text, "--json"]) == 0
    sharded, plain = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert sharded == plain


def test_a_damaged_sharded_checkpoint_is_a_one_line_error(tmp_path, ddp, capsys):
    out = tmp_path / "run"
    shutil.copytree(ddp[0], out)
    shard = out / "checkpoint" / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    text = tmp_path / "eval.txt"
    text.write_text("the state of the world\n" * 20)
    assert main(["eval", "--checkpoint", str(out), "--text", str(text)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"attnres: error: cannot load {out / 'checkpoint' / 'dcp'}: " in err


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_resuming_a_finished_job_without_its_result_file_ends_on_every_rank(tmp_path, ddp, damage):
    """The ranks decide alike whether a finished run needs its result.json rewritten (no rank waits alone)."""
    out = tmp_path / "run"
    shutil.copytree(ddp[0], out)
    if damage == "missing":
        (out / "result.json").unlink()
    else:
        (out / "result.json").write_text('{"residual": "block"}')
    proc = torchrun(["-m", "attnres", "train", "--out", str(out), "--resume", "--no-progress"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "already finished (step 6 of max_steps 6)" in proc.stdout
    assert json.loads((out / "result.json").read_text())["steps"] == 6
