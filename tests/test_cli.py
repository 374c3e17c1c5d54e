"""The ``attnres`` command: help, eval/generate, compare end to end, and one-line errors for bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from attnres import AttnResConfig, AttnResForCausalLM
from attnres.cli import build_parser, main
from attnres.data import byte_tokenizer

from .train.helpers import TINY, write_corpus

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory, corpus, data_dir) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {"preset": "smoke", **TINY, "max_steps": 4, "sources": [str(corpus)], "data_dir": str(data_dir)}
        )
    )
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_yaml) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--config", str(tiny_yaml), "--out", str(out), "--no-progress"]) == 0
    return out


def run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the inputs printed
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: --help and usage errors
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc, err, match):
    lines = err.strip().splitlines()
    assert rc not in (0, None), err
    assert len(lines) == 1, err
    assert lines[0].startswith("attnres: error: "), lines[0]
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


# ----------------------------------------------------------------------------- help

COMMANDS = ["demo", "compare", "train", "eval", "generate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_lists_its_options(command, capsys):
    rc, out, _ = run([command, "--help"], capsys)
    assert rc == 0 and out.startswith(f"usage: attnres {command}")
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in out, flag


def test_top_level_help_lists_every_command(capsys):
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0 and all(c in out for c in COMMANDS) and "exit codes" in out


# ----------------------------------------------------------------------------- eval / generate


def test_eval_reports_loss_ppl_and_bits_per_byte_as_json(trained, corpus, capsys):
    rc, out, _ = run(["eval", "--checkpoint", trained, "--text", corpus / "doc0.txt", "--json"], capsys)
    assert rc == 0
    r = json.loads(out)
    assert set(r) == {"loss", "ppl", "bits_per_byte", "tokens"}
    assert r["ppl"] == pytest.approx(2.718281828 ** r["loss"], rel=1e-6)
    text = (corpus / "doc0.txt").read_text()
    n_tokens = len(text.encode())  # byte tokenizer: one token per byte
    assert r["tokens"] == (n_tokens // 32) * 31
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / 0.6931471805599453, rel=1e-6)
    rc, out, _ = run(["eval", "--checkpoint", trained / "checkpoint", "--text", corpus / "doc0.txt"], capsys)
    assert rc == 0 and "bits/byte" in out


def test_generate_continues_the_prompt_reproducibly(trained, capsys):
    args = ["generate", "--checkpoint", trained, "--prompt", "The man", "--max-new-tokens", 12, "--seed", 1]
    rc, out, _ = run(args, capsys)
    assert rc == 0 and out.startswith("The man") and len(out.rstrip("\n")) > len("The man")
    assert run(args, capsys)[1] == out
    rc, greedy, _ = run([*args[:-2], "--temperature", 0], capsys)
    assert rc == 0 and greedy.startswith("The man")


# ----------------------------------------------------------------------------- compare


def test_compare_smoke_writes_summary_report_and_plots(tmp_path, corpus, data_dir, capsys):
    out = tmp_path / "cmp"
    rc, stdout, err = run(
        [
            "compare",
            "--preset",
            "smoke",
            "--out",
            out,
            "--no-progress",
            "--set",
            f"sources={corpus}",
            "--set",
            f"data_dir={data_dir}",
        ],
        capsys,
    )
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["residual"] for r in summary] == ["standard", "block", "full"]
    for r in summary:
        assert {"residual", "seed", "val_loss", "ppl", "bpb", "tokens_per_s", "params", "step_time"} <= set(r)
        assert (out / f"{r['residual']}-s0" / "checkpoint").is_dir()
    assert len({r["tokens"] for r in summary}) == 1  # equal budgets
    assert summary[0]["params"] < summary[1]["params"] == summary[2]["params"]
    report = (out / "report.md").read_text()
    for png in (
        "loss.png",
        "magnitudes.png",
        "grad_norms.png",
        "depth_weights_full.png",
        "depth_weights_block.png",
    ):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report
    assert "attnres compare --preset smoke" in report and "torch" in report and "| standard |" in report
    assert "## Training dynamics" in report
    assert "standard" in stdout and "val loss" in stdout
    # a second compare into the same OUT is refused; --resume reuses the finished arms
    assert_one_line_error(*run(["compare", "--preset", "smoke", "--out", out], capsys)[::2], "already holds")
    rc, _, err = run(
        [
            "compare",
            "--preset",
            "smoke",
            "--out",
            out,
            "--resume",
            "--no-progress",
            "--set",
            f"sources={corpus}",
            "--set",
            f"data_dir={data_dir}",
        ],
        capsys,
    )
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text()) == summary


def test_compare_with_two_seeds_reports_mean_and_std(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "cmp"
    rc, stdout, err = run(
        [
            "compare",
            "--config",
            tiny_yaml,
            "--preset",
            "smoke",
            "--seeds",
            2,
            "--out",
            out,
            "--no-progress",
            "--set",
            "max_steps=2",
            "--set",
            "eval_every=2",
        ],
        capsys,
    )
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert sorted((r["residual"], r["seed"]) for r in summary) == sorted(
        (r, s) for r in ("standard", "block", "full") for s in (0, 1)
    )
    assert "±" in (out / "report.md").read_text()
    # --resume with a larger budget trains every arm on from its checkpoint
    argv = [
        "compare",
        "--config",
        tiny_yaml,
        "--preset",
        "smoke",
        "--seeds",
        2,
        "--out",
        out,
        "--no-progress",
    ]
    rc, _, err = run([*argv, "--resume", "--set", "max_steps=3", "--set", "eval_every=2"], capsys)
    assert rc == 0, err
    assert [r["steps"] for r in json.loads((out / "summary.json").read_text())] == [3] * 6
    # ... and refuses a changed model
    rc, _, err = run([*argv, "--resume", "--set", "max_steps=3", "--set", "hidden_size=64"], capsys)
    assert_one_line_error(rc, err, "cannot resume with a different config: hidden_size")


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def bad(tmp_path, trained, corpus):
    """Builders of bad inputs, each returning an argv."""

    def checkpoint_with(name):
        d = tmp_path / name
        shutil.copytree(trained / "checkpoint", d)
        return d

    def text(content, name="t.txt", mode="w"):
        p = tmp_path / name
        (p.write_bytes if mode == "wb" else p.write_text)(content)
        return p

    ok_text = corpus / "doc0.txt"
    return dict(checkpoint_with=checkpoint_with, text=text, ok_text=ok_text)


def _foreign_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def _vocab_mismatch(tmp_path):
    d = tmp_path / "small-vocab"
    AttnResForCausalLM(
        AttnResConfig(
            vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def _corrupt(bad):
    d = bad["checkpoint_with"]("corrupt")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return d


EVAL_CASES = {
    "missing text file": (
        lambda b, t: ["--checkpoint", "TRAINED", "--text", t / "nope.txt"],
        "text file not found",
    ),
    "empty text file": (
        lambda b, t: ["--checkpoint", "TRAINED", "--text", b["text"]("  \n")],
        "text file is empty",
    ),
    "not utf-8": (
        lambda b, t: ["--checkpoint", "TRAINED", "--text", b["text"](b"\xff\xfe\xfa", "b.txt", "wb")],
        "not UTF-8",
    ),
    "text shorter than one sequence": (
        lambda b, t: ["--checkpoint", "TRAINED", "--text", b["text"]("Too short.")],
        "shorter than one sequence",
    ),
    "missing checkpoint": (
        lambda b, t: ["--checkpoint", t / "nowhere", "--text", b["ok_text"]],
        "checkpoint not found",
    ),
    "dir without our config": (
        lambda b, t: ["--checkpoint", t, "--text", b["ok_text"]],
        "not an attnres checkpoint",
    ),
    "non-attnres model_type": (
        lambda b, t: ["--checkpoint", _foreign_llama(t), "--text", b["ok_text"]],
        "not an attnres model",
    ),
    "corrupt weights": (
        lambda b, t: ["--checkpoint", _corrupt(b), "--text", b["ok_text"]],
        "cannot load the model",
    ),
    "tokenizer/model vocab mismatch": (
        lambda b, t: ["--checkpoint", _vocab_mismatch(t), "--text", b["ok_text"]],
        "vocab mismatch",
    ),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_bad_eval_input_gives_one_line_error(case, bad, tmp_path, trained, capsys):
    build, match = EVAL_CASES[case]
    argv = [trained if a == "TRAINED" else a for a in build(bad, tmp_path)]
    rc, _, err = run(["eval", *argv], capsys)
    assert_one_line_error(rc, err, match)


def test_bad_generate_input_gives_one_line_error(tmp_path, trained, capsys):
    assert_one_line_error(
        *run(["generate", "--checkpoint", _foreign_llama(tmp_path), "--prompt", "Hi"], capsys)[::2],
        "not an attnres model",
    )
    assert_one_line_error(*run(["generate", "--checkpoint", trained, "--prompt", ""], capsys)[::2], "empty")


def _empty_corpus(t):
    d = t / "empty-corpus"
    d.mkdir()
    (d / "a.txt").write_text("")
    (d / "b.txt").write_text("")
    return d


def _short_corpus(t):
    return write_corpus(t / "short-corpus", docs=2, lines=1)


TRAIN_CASES = {
    "unknown preset": (["--preset", "huge"], "invalid choice: 'huge'"),
    "unknown config key": (["--set", "learning_rate=1"], "unknown config key 'learning_rate'"),
    "bad value": (["--set", "max_steps=many"], "max_steps must be an integer"),
    "unknown key in yaml": (lambda t: ["--config", _yaml(t, {"foo": 1})], "unknown config key 'foo'"),
    "missing yaml": (lambda t: ["--config", t / "none.yaml"], "config file not found"),
    "missing data source": (lambda t: ["--set", f"sources={t / 'nope.txt'}"], "not found"),
    "empty data source": (lambda t: ["--set", f"sources={_empty_corpus(t)}"], "empty data file"),
    "data shorter than one sequence": (
        lambda t: ["--set", f"sources={_short_corpus(t)}", "--set", "seq_len=512"],
        "fewer than one sequence",
    ),
    "resume with nothing to resume": (
        lambda t: ["--resume", "--out", t / "fresh"],
        "no checkpoint to resume",
    ),
}


def _yaml(t, values):
    p = t / "bad.yaml"
    p.write_text(yaml.safe_dump(values))
    return p


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_train_input_gives_one_line_error(case, tmp_path, tiny_yaml, data_dir, capsys):
    args, match = TRAIN_CASES[case]
    args = args(tmp_path) if callable(args) else args
    base = [
        "train",
        "--config",
        tiny_yaml,
        "--out",
        tmp_path / "out",
        "--no-progress",
        "--set",
        f"data_dir={data_dir}",
    ]
    if "--config" in args:
        base = base[:1] + base[3:]
    rc, _, err = run([*base, *args], capsys)
    assert_one_line_error(rc, err, match)
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_train_into_an_existing_run_is_refused_without_resume_or_overwrite(trained, tiny_yaml, capsys):
    before = (trained / "metrics.jsonl").read_bytes()
    rc, _, err = run(["train", "--config", tiny_yaml, "--out", trained, "--no-progress"], capsys)
    assert_one_line_error(rc, err, "already holds a run")
    assert (trained / "metrics.jsonl").read_bytes() == before


def test_compare_refuses_to_set_residual_or_seed(capsys):
    assert_one_line_error(*run(["compare", "--set", "residual=full"], capsys)[::2], "compare sets 'residual'")
    assert_one_line_error(*run(["compare", "--seeds", 0], capsys)[::2], "--seeds must be >= 1")


def test_errors_are_one_line_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnres.cli",
            "eval",
            "--checkpoint",
            str(tmp_path / "x"),
            "--text",
            str(tmp_path / "y.txt"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"attnres: error: text file not found: {tmp_path / 'y.txt'}"]


def test_demo_still_runs(capsys):
    torch.manual_seed(0)
    rc, out, _ = run(["demo"], capsys)
    assert rc == 0 and "block" in out and "read" in out
