"""``torchrun --nproc_per_node=2 -m attnres train --set pipeline_stages=2`` end to end (gloo, CPU, fp32):
the single-process run's train losses, gradient norms and validation losses for 1F1B and Interleaved1F1B
(V=2), with the cross-stage cache and without (1F1B naive with activation checkpointing), for Block
AttnRes with S=3 (the block straddles the stage boundaries); a SIGTERMed pipeline run resumed with
``--resume`` equals the uninterrupted one bit for bit; each rank's checkpoint part holds only its stages'
parameters and their optimizer states; ``attnres export`` gives a model one process loads, with the
single-process run's weights and logits; dp x pp and bf16 are one-line errors.

Every pipeline run is one command of a single torchrun job (``pipeline_jobs.py``): its processes start once.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader

from attnres import AttnResForCausalLM
from attnres.cli import main
from attnres.train import find_checkpoint, read_metrics
from attnres.train.checkpoint import load_model, load_trainer_state

from .._stderr import attnres_lines
from ..train.helpers import TINY, write_corpus
from .launch import torchrun

JOBS = str(Path(__file__).with_name("pipeline_jobs.py"))
# 4 layers = 8 sublayers, blocks of S=3: every stage boundary (j = 4; j = 2, 4, 6 for V=2) but j = 6 cuts a
# block. seq_len 29 leaves 3 windows in the validation split's last batch of 4 (75 windows), so evaluation
# also takes the short batch (a whole microbatch plus a rest repeated per microbatch). grad_accum 2 and an
# active clip (the gradient norms are 1.2 to 1.5).
RUN = dict(num_hidden_layers=4, attn_res_block_size=3, seq_len=29, grad_accum=2, grad_clip=0.5, max_steps=4,
           eval_every=2, checkpoint_every=2, eval_batches=0)
PIPELINE = ["pipeline_stages=2"]
INTERLEAVED = [*PIPELINE, "pipeline_virtual=2", "pipeline_schedule=Interleaved1F1B"]
PLANS = {
    "1f1b-cache": PIPELINE,
    "1f1b-naive": [*PIPELINE, "pipeline_cache=false", "activation_checkpointing=true"],
    "interleaved-cache": INTERLEAVED,
    "interleaved-naive": [*INTERLEAVED, "pipeline_cache=false", "probes=true"],  # progress on: the probes line
}
# fp32: a pipeline's loss is the mean of its microbatches' means, its gradient the mean of theirs, its norm
# summed over two ranks; AdamW carries the last-bit differences on. Measured <= 1e-7 relative over 4 steps
# (train loss 8.8e-8, gradient norm 9.6e-8, validation loss 2.1e-8).
FP32 = dict(rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The single-process run, then one torchrun job: every plan of PLANS, and the 1F1B run SIGTERMed on
    rank 1 in step 3 (its checkpoints: step 2, then step 3 on the signal) and resumed."""
    root = tmp_path_factory.mktemp("pipeline-train")
    values = {"preset": "smoke", **TINY, **RUN, "sources": [str(write_corpus(root / "corpus"))],
              "data_dir": str(root / "data")}
    (root / "run.yaml").write_text(yaml.safe_dump(values))
    out = {name: root / name for name in [*PLANS, "single", "stopped"]}
    train = ["train", "--config", str(root / "run.yaml")]
    assert main([*train, "--out", str(out["single"]), "--no-progress"]) == 0
    jobs = [{"argv": [*train, "--out", str(out[name]), *sets(plan), *quiet(name)]} for name, plan in PLANS.items()]
    stopped = ["--out", str(out["stopped"]), "--no-progress"]
    jobs += [{"argv": [*train, *stopped, *sets(PIPELINE)], "sigterm": [1, 4]},
             {"argv": ["train", *stopped, "--resume"]}]
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = torchrun([JOBS, str(root / "jobs.json")])
    assert proc.returncode == 0, proc.stderr
    codes = [json.loads((root / f"jobs.json.rank{r}").read_text()) for r in range(2)]
    return {**out, "proc": proc, "codes": codes}


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def quiet(name: str) -> list[str]:
    return [] if "probes=true" in PLANS.get(name, []) else ["--no-progress"]


def rows(out: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(out / "metrics.jsonl") if key in r]


def test_every_command_of_the_job_ran(runs):
    assert runs["codes"] == [[0, 0, 0, 0, 143, 0]] * 2  # 143: stopped by SIGTERM, checkpoint saved


@pytest.mark.parametrize("name", list(PLANS))
def test_a_pipeline_run_gives_the_single_process_losses(runs, name):
    for key in ("train_loss", "grad_norm", "val_loss", "bpb"):
        got, want = rows(runs[name], key), rows(runs["single"], key)
        assert [s for s, _ in got] == [s for s, _ in want] and len(got) >= 2, key
        torch.testing.assert_close([x for _, x in got], [x for _, x in want], **FP32, msg=lambda m, k=key: f"{k}: {m}")
    assert runs["proc"].stdout.count(f"-> {runs[name]}") == 1  # rank 0 alone prints the summary
    state = load_trainer_state(find_checkpoint(runs[name]))
    assert state["world_size"] == 2 and state["step"] == 4


def test_probes_are_off_under_a_pipeline_said_once(runs):
    err = runs["proc"].stderr
    assert err.count("probes off: a pipeline rank holds only its stages' part of the model\n") == 1
    assert err.count("step 2/4 val_loss") == 1  # the progress lines of the run with progress on, once
    assert not any("probes" in r for r in read_metrics(runs["interleaved-naive"] / "metrics.jsonl"))


def test_a_sigtermed_pipeline_run_resumes_exactly(runs):
    assert "attnres: interrupted by SIGTERM at step 3" in runs["proc"].stderr
    for key in ("train_loss", "grad_norm", "val_loss"):
        assert rows(runs["stopped"], key) == rows(runs["1f1b-cache"], key), key  # bitwise
    assert json.loads((runs["stopped"] / "run.json").read_text())["resumes"][0]["step"] == 3


def _owner(name: str, plan: str) -> int:
    """The rank whose stages hold parameter ``name`` (4 layers; 1F1B: stages 0, 1; interleaved: 0, 1, 0, 1)."""
    if name.startswith("model.embed_tokens"):
        return 0
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        return layer // 2 if plan.startswith("1f1b") else layer % 2
    return 1  # final norm, output_res, lm_head: the last stage


@pytest.mark.parametrize("name", ["1f1b-cache", "interleaved-cache"])
def test_each_rank_saves_only_its_stages_parameters_and_their_optimizer_states(runs, name):
    meta = FileSystemReader(str(find_checkpoint(runs[name]) / "dcp")).read_metadata()
    files: dict[str, set[str]] = {}
    for index, info in meta.storage_data.items():
        files.setdefault(info.relative_path, set()).add(index.fqn)
    params = [n for n, _ in AttnResForCausalLM(load_model(find_checkpoint(runs["single"])).config).named_parameters()]
    for n in params:
        mine, other = files[f"__{_owner(n, name)}_0.distcp"], files[f"__{1 - _owner(n, name)}_0.distcp"]
        entries = {f"model.{n}", f"optim.state.{n}.exp_avg", f"optim.param_groups.{n}.lr"}
        assert entries <= mine and not entries & other, n


def test_export_loads_in_one_process_with_the_single_process_logits(runs, tmp_path):
    plain = tmp_path / "plain"
    assert main(["export", "--checkpoint", str(runs["interleaved-cache"]), "--out", str(plain)]) == 0
    model, ref = AttnResForCausalLM.from_pretrained(plain).eval(), load_model(find_checkpoint(runs["single"])).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(0))
    for n, p in model.named_parameters():  # measured <= 2.7e-6 (4 AdamW steps move weights ~1e-3)
        torch.testing.assert_close(p, ref.get_parameter(n), rtol=0, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    with torch.no_grad():  # measured 1.9e-7
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "n, values, message",
    [
        (4, PIPELINE, "pipeline_stages=2 on 4 processes would be 2 data-parallel pipelines, which `attnres "
                      "train` does not support yet; launch exactly 2 processes"),
        (2, [*PIPELINE, "bf16=true"], "bf16=true with pipeline_stages > 1: bf16 autocast across pipeline stages "
                                      "is not supported; set bf16=false"),
    ],
)
def test_bad_combinations_are_one_line_errors(monkeypatch, capsys, tmp_path, n, values, message):
    for key, value in {"WORLD_SIZE": str(n), "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)  # rank 0 of a torchrun job, faked: no process group starts
    keys = {**TINY, **RUN, "sources": tmp_path / "corpus", "data_dir": tmp_path / "data"}
    args = ["train", "--preset", "smoke", "--out", str(tmp_path / "run"), "--no-progress",
            *sets([f"{k}={v}" for k, v in keys.items()] + values)]
    assert main(args) == 1
    assert attnres_lines(capsys.readouterr().err) == [f"attnres: error: {message}"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # refused before any work
