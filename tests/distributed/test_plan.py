"""What a user can get wrong about a job of several processes: one line each, raised before any process
group starts (so a bad plan never leaves a job waiting). No processes are started here: torchrun's
environment is faked."""

from dataclasses import replace

import pytest

from attnres.cli import main
from attnres.distributed.checkpoint import export_pretrained
from attnres.distributed.plan import ParallelPlan
from attnres.train import CheckpointError, ConfigError

from .._stderr import attnres_lines
from ..train.helpers import TINY, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def job(monkeypatch):
    """Pretend to be rank 0 of a torchrun job of ``n`` processes (no MASTER_ADDR unless given)."""

    def make(n: int, **env):
        for key, value in {"WORLD_SIZE": str(n), "RANK": "0", "LOCAL_RANK": "0", **env}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("MASTER_ADDR", raising=False)

    return make


def _error(capsys, corpus, tmp_path, *sets: str) -> str:
    args = ["train", "--preset", "smoke", "--out", str(tmp_path / "run"), "--no-progress",
            "--set", f"sources={corpus}", "--set", f"data_dir={tmp_path / 'data'}"]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 1
    lines = attnres_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert not (tmp_path / "data").exists()  # refused before the data was prepared
    return lines[0]


@pytest.mark.parametrize(
    "n, sets, message",
    [
        (2, ["batch_size=3"], "batch_size=3 (the global micro-batch) does not split evenly over 2 data-parallel "
                              "ranks; use a multiple of 2"),
        (3, ["pipeline_stages=2"], "the job has 3 process(es) (torchrun --nnodes x --nproc_per_node), not a "
                                   "multiple of pipeline_stages=2"),
        (4, ["pipeline_stages=2"], "would be 2 data-parallel pipelines, which `attnres train` does not support yet"),
        (1, ["parallel=fsdp", "optimizer=muon"], "parallel=fsdp with optimizer=muon: Muon orthogonalises whole"),
        (1, ["parallel=zero"], "parallel must be one of ddp, fsdp; got 'zero'"),
        (1, ["pipeline_schedule=1f1b"], "pipeline_schedule must be one of GPipe, 1F1B,"),
        (2, [], "WORLD_SIZE=2 but no MASTER_ADDR: launch several processes with torchrun"),
    ],
)
def test_bad_plans_are_one_line_errors(job, capsys, corpus, tmp_path, n, sets, message):
    job(n)
    assert message in _error(capsys, corpus, tmp_path, *sets)


def test_a_bad_torchrun_environment_is_reported_by_the_rank_that_has_it(job, capsys, corpus, tmp_path):
    job(2, RANK="1", LOCAL_RANK="x")  # a rank other than 0 reports errors of its own only
    assert "LOCAL_RANK='x' in the environment is not an integer" in _error(capsys, corpus, tmp_path)


def test_an_error_every_rank_shares_is_reported_by_rank_0_alone(job, capsys, corpus, tmp_path):
    job(2, RANK="1")
    args = ["train", "--preset", "smoke", "--out", str(tmp_path / "run"), "--set", "batch_size=3",
            "--set", f"sources={corpus}"]
    assert main(args) == 1
    assert attnres_lines(capsys.readouterr().err) == []


def test_a_device_index_with_several_processes_is_refused(corpus, tmp_path):
    from attnres.train import load_config

    cfg = replace(load_config("smoke", overrides={**TINY, "sources": [str(corpus)]}), device="cuda:1")
    with pytest.raises(ConfigError, match=r"device='cuda:1': with several processes give device=cuda"):
        ParallelPlan.from_config(cfg, 2).check(cfg)


def test_compare_refuses_to_run_under_torchrun(job, capsys):
    job(2)
    assert main(["compare", "--preset", "smoke"]) == 1
    assert "compare runs its arms in one process" in capsys.readouterr().err


def test_export_refuses_a_directory_with_files(tmp_path):
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "x").write_text("")
    with pytest.raises(CheckpointError, match="already exists and is not an empty directory"):
        export_pretrained(tmp_path / "nowhere", tmp_path / "dest")
