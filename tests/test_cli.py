"""The ``attnres`` command: help, eval/generate, compare end to end, and one-line errors for bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import attnres_cli
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
        yaml.safe_dump({"preset": "smoke", **TINY, "max_steps": 4, "sources": [str(corpus)], "data_dir": str(data_dir)})
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

COMMANDS = ["demo", "compare", "train", "eval", "generate", "export", "convert", "ablate", "upcycle"]


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


def test_the_light_parser_names_the_package_presets_and_residuals():
    from attnres.residual import RESIDUALS as SCHEMES
    from attnres.train.config import PRESETS, RESIDUALS

    assert attnres_cli.PRESETS == tuple(PRESETS)
    assert attnres_cli.RESIDUALS == RESIDUALS  # in the order --help lists them
    assert attnres_cli.RESIDUALS == SCHEMES  # the registry's order (attnres/residual/registry.py)


HEAVY = ("attnres", "torch", "transformers", "numpy", "rich")


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["train", "--help"], 0), (["train", "--preset", "x"], 2)])
def test_help_and_usage_errors_do_not_import_attnres_or_torch(argv, code):
    """The console script (attnres_cli:main) answers these without ``import attnres`` (seconds: torch,
    transformers)."""
    script = "import sys; from attnres_cli import main; sys.exit(main())"  # what pip's `attnres` script runs
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", script, *argv], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == code, proc.stderr[-2000:]
    imported = [ln.rsplit("|", 1)[1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    assert "argparse" in imported and "attnres_cli" in imported
    assert not [m for m in imported if m.split(".")[0] in HEAVY]
    if code:
        assert proc.stderr.splitlines()[-1] == "attnres: error: argument --preset: invalid choice: 'x' " + (
            "(choose from 'smoke', 'default', 'long')"
        )
    else:
        assert proc.stdout.startswith("usage: attnres")


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
        LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def _vocab_mismatch(tmp_path):
    d = tmp_path / "small-vocab"
    AttnResForCausalLM(
        AttnResConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
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
        "corrupt",
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


@pytest.mark.parametrize("module", ["attnres.cli", "attnres_cli"])  # in process; the console script's
def test_errors_are_one_line_in_a_real_process(module, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            module,
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
    assert "random pseudo-queries (std 0.5, seed 0)" in out.splitlines()[0]
    assert "block size 2 sublayers" in out  # the resolved S of the reference config


# ----------------------------------------------------------------------------- user errors vs bugs


@pytest.mark.parametrize(
    "bug",
    [
        lambda: {}["missing"],  # KeyError
        lambda: len(3),  # TypeError
        lambda: int("x"),  # a ValueError, but not one of attnres's own checks
        lambda: torch.zeros(2).view(3),  # RuntimeError from inside torch
    ],
)
def test_internal_errors_are_not_turned_into_one_line_messages(bug, monkeypatch):
    monkeypatch.setattr("attnres.cli._demo", lambda args: bug())
    with pytest.raises((KeyError, TypeError, ValueError, RuntimeError)):
        main(["demo"])


def test_an_internal_type_error_shows_its_traceback_in_a_real_process():
    code = "import sys, attnres.cli as c; c._demo = lambda a: len(3); sys.exit(c.main(['demo']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "TypeError" in proc.stderr
    assert "attnres: error" not in proc.stderr


@pytest.mark.parametrize(
    "flag, value", [("--seq-len", 0), ("--seq-len", -3), ("--max-batches", 0), ("--batch-size", 0)]
)
def test_eval_zero_is_an_error_not_the_default(flag, value, trained, corpus, capsys):
    rc, out, err = run(["eval", "--checkpoint", trained, "--text", corpus / "doc0.txt", flag, value], capsys)
    assert_one_line_error(rc, err, f"{flag} must be > 0, got {value}")
    assert out == ""


def test_demo_rejects_a_negative_query_std_before_printing(capsys):
    rc, out, err = run(["demo", "--query-std", -1], capsys)
    assert_one_line_error(rc, err, "--query-std must be >= 0, got -1.0")
    assert out == ""


def _train_argv(tiny_yaml, out, data_dir, *extra):
    return ["train", "--config", tiny_yaml, "--out", out, "--no-progress", "--set", f"data_dir={data_dir}", *extra]


@pytest.mark.parametrize(
    "item, match",
    [
        ("lr=nan", "lr must be finite, got nan"),
        ("lr=inf", "lr must be finite, got inf"),
        ("weight_decay=-0.1", "weight_decay must be >= 0"),
        ("eps=nan", "eps must be finite"),
        ("seq_len=10000000", "seq_len=10000000 with batch_size=4 needs about"),
        ("device=tpu", "device must be one of cpu, cuda"),
    ],
)
def test_bad_values_are_rejected_before_the_run_dir_is_made(item, match, tmp_path, tiny_yaml, data_dir, capsys):
    out = tmp_path / "out"
    rc, _, err = run(_train_argv(tiny_yaml, out, data_dir, "--set", item), capsys)
    assert_one_line_error(rc, err, match)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, tiny_yaml, data_dir, capsys):
    rc, _, err = run(_train_argv(tiny_yaml, tmp_path / "out", data_dir, "--set", "device=cuda"), capsys)
    assert_one_line_error(rc, err, "device 'cuda': CUDA is not available")
    assert "AssertionError" not in err and not (tmp_path / "out").exists()


def test_warmup_above_max_steps_names_the_setting(capsys):
    rc, _, err = run(["train", "--preset", "smoke", "--max-steps", 3], capsys)
    assert_one_line_error(rc, err, "warmup_steps (6) must be <= max_steps (3); lower it with --set warmup_steps=N")


def test_a_diverging_fresh_run_says_it_has_no_checkpoint_and_leaves_nothing(tmp_path, tiny_yaml, data_dir, capsys):
    out = tmp_path / "out"
    diverge = ["--set", "lr=1e12", "--set", "grad_clip=0", "--set", "warmup_steps=0"]
    rc, _, err = run(_train_argv(tiny_yaml, out, data_dir, *diverge), capsys)
    assert rc == 3, err
    assert "has no checkpoint yet" in err and "last good" not in err
    assert not out.exists()  # nothing half-made blocks the re-run
    rc, _, err = run(_train_argv(tiny_yaml, out, data_dir), capsys)
    assert rc == 0, err


def test_resume_below_the_checkpoint_step_is_refused(trained, capsys):
    before = (trained / "metrics.jsonl").read_bytes()
    rc, _, err = run(["train", "--out", trained, "--resume", "--no-progress", "--max-steps", 2], capsys)
    assert_one_line_error(rc, err, "already at step 4, past max_steps=2")
    assert (trained / "metrics.jsonl").read_bytes() == before


def test_resume_of_a_finished_run_says_it_is_finished(trained, capsys):
    before = (trained / "metrics.jsonl").read_bytes()
    rc, out, err = run(["train", "--out", trained, "--resume", "--no-progress"], capsys)
    assert rc == 0, err
    assert "already finished (step 4 of max_steps 4); nothing to train" in out
    assert "val_loss" in out
    assert (trained / "metrics.jsonl").read_bytes() == before
