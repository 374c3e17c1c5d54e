"""compare: --resume continues the saved arms on equal terms or refuses; the report states real N and vocab."""

import json
import os
import signal
from dataclasses import replace

import pytest
import yaml

import attnres.data
from attnres.cli import main
from attnres.train import find_checkpoint, load_config, train
from attnres.train.checkpoint import load_trainer_state
from attnres.train.compare import (
    check_equal_terms,
    compare,
    explicit_keys,
    num_blocks,
    table_rows,
    write_report,
)
from attnres.train.config import ConfigError
from attnres.train.loop import TrainingInterrupted

SMALL = dict(max_steps=6, eval_every=3, checkpoint_every=3)


def _step(d) -> int:
    return load_trainer_state(find_checkpoint(d))["step"]


def _interrupt_first_arm_at_step_4(monkeypatch):
    get = attnres.data.Batches.get
    fired = []

    def get_and_interrupt(self, step):
        if step == 3 and not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # the loop's handler sets a flag; step 4 completes
        return get(self, step)

    monkeypatch.setattr(attnres.data.Batches, "get", get_and_interrupt)


@pytest.fixture
def interrupted(tmp_path, tiny_cfg, monkeypatch):
    """A compare run with max_steps=6 stopped by SIGINT in its first arm (standard) at step 4."""
    out = tmp_path / "cmp"
    cfg = tiny_cfg(**SMALL)
    _interrupt_first_arm_at_step_4(monkeypatch)
    with pytest.raises(TrainingInterrupted):
        compare(cfg, out, [0], preset="smoke", progress=False, argv=[])
    monkeypatch.undo()
    assert _step(out / "standard-s0") == 4
    assert not (out / "block-s0").exists() and not (out / "report.md").exists()
    return out, cfg


def _snapshot(out):
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def test_resume_without_set_reuses_the_saved_config_and_writes_an_equal_report(interrupted):
    out, cfg = interrupted
    # as `compare --resume` without --set: the command's max_steps is the preset's, not the saved 6
    runs = compare(replace(cfg, max_steps=2), out, [0], preset="smoke", resume=True, progress=False,
                   argv=[], overrides={})
    assert [r["steps"] for r in runs] == [6, 6, 6]
    assert all(r["val_loss"] is not None for r in runs)
    for r in ("block", "full"):
        info = json.loads((out / f"{r}-s0" / "run.json").read_text())
        assert info["config"]["max_steps"] == 6
    report = (out / "report.md").read_text()
    assert "6 steps" in report and "max_steps: 6" in report


def test_explicit_keys_are_what_differs_from_the_preset():
    cfg = load_config("smoke", overrides={"max_steps": 600, "lr": 0.002})
    assert explicit_keys(cfg, "smoke") == {"max_steps": 600, "lr": 0.002}
    assert explicit_keys(load_config("smoke"), "smoke") == {}


def test_resume_refuses_max_steps_below_an_arms_step_and_changes_nothing(interrupted):
    out, cfg = interrupted
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"max_steps=3 is below .*standard-s0 at step 4"):
        compare(replace(cfg, max_steps=3), out, [0], preset="smoke", resume=True,
                progress=False, argv=[], overrides={"max_steps": 3})
    assert _snapshot(out) == before


def test_resume_refuses_a_max_steps_change_that_splits_the_schedules(interrupted):
    out, cfg = interrupted
    before = _snapshot(out)
    # standard would stretch its schedule at step 4, block and full start on 12 from step 0
    with pytest.raises(ConfigError, match="different learning-rate schedules.*max_steps=6"):
        compare(replace(cfg, max_steps=12), out, [0], preset="smoke", resume=True, progress=False,
                argv=[], overrides={"max_steps": 12})
    assert _snapshot(out) == before


def _yaml(tmp_path, cfg, drop=()):
    path = tmp_path / "cfg.yaml"
    drop = {"residual", "seed", *drop}
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k not in drop}))
    return path


def test_cli_resume_without_set_keeps_the_saved_max_steps(interrupted, tmp_path, capsys):
    out, cfg = interrupted
    path = _yaml(tmp_path, cfg, drop=("max_steps",))  # so the command alone says the preset's 60
    rc = main(["compare", "--preset", "smoke", "--config", str(path), "--out", str(out), "--resume",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert [r["steps"] for r in json.loads((out / "summary.json").read_text())] == [6, 6, 6]
    # an explicit --set of a model key equal to the preset's is still a change, and refused
    rc = main(["compare", "--preset", "smoke", "--config", str(path), "--out", str(out), "--resume",
               "--no-progress", "--set", "hidden_size=64"])
    assert rc == 1 and "cannot resume with a different config: hidden_size" in capsys.readouterr().err


def test_cli_resume_refusal_is_one_line_and_exit_1(interrupted, tmp_path, capsys):
    out, cfg = interrupted
    path = _yaml(tmp_path, cfg)
    rc = main(["compare", "--preset", "smoke", "--config", str(path), "--out", str(out), "--resume",
               "--no-progress", "--set", "max_steps=3"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("attnres: error: compare --resume: max_steps=3")
    assert "NoneType" not in err


def test_resume_refuses_saved_arms_with_different_hyperparameters(tmp_path, tiny_cfg):
    out = tmp_path / "cmp"
    cfg = tiny_cfg(max_steps=2, eval_every=2, checkpoint_every=2)
    train(replace(cfg, residual="standard"), out / "standard-s0", progress=False)
    train(replace(cfg, residual="block", lr=3e-3), out / "block-s0", progress=False)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"saved with different configs.*lr: standard-s0 0.001, block-s0 0.003"):
        compare(cfg, out, [0], preset="smoke", resume=True, progress=False, argv=[], overrides={})
    assert _snapshot(out) == before and not (out / "full-s0").exists()


def test_no_report_over_arms_at_different_steps(tmp_path, tiny_cfg):
    cfg = tiny_cfg(max_steps=2, eval_every=2, checkpoint_every=2)
    runs = [train(replace(cfg, residual="standard"), tmp_path / "standard-s0", progress=False),
            train(replace(cfg, max_steps=4, residual="block"), tmp_path / "block-s0", progress=False)]
    with pytest.raises(ConfigError, match=r"not writing a report.*different steps.*different configs"):
        check_equal_terms(runs)


def test_table_and_report_survive_a_run_without_evaluation(tmp_path, tiny_cfg):
    run = {"residual": "standard", "seed": 0, "params": 10, "steps": 2, "tokens": 8, "train_loss": None,
           "val_loss": None, "ppl": None, "bpb": None, "step_time": None, "tokens_per_s": None,
           "train_time": 0.0, "out_dir": str(tmp_path / "none"), "num_blocks": 2}
    assert table_rows([run])[0]["val loss"] == "-"
    text = write_report(tmp_path, tiny_cfg(), [run], [0], "smoke", [], 1.0)
    assert "| standard-s0 | 2 | - |" in text


def test_report_shows_the_models_block_count_and_the_tokenizers_vocab(tmp_path, tiny_cfg):
    # 2 layers = 4 sublayers, blocks of 3 sublayers: N = 2, whatever attn_res_num_blocks says
    cfg = tiny_cfg(max_steps=2, eval_every=2, checkpoint_every=2, attn_res_block_size=3, attn_res_num_blocks=4)
    assert num_blocks(cfg) == 2
    runs = compare(cfg, tmp_path / "cmp", [0], preset="smoke", progress=False, argv=[])
    assert table_rows(runs)[1]["residual"] == "block (N=2)"
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "Block AttnRes (N=2)" in report and "N=4" not in report
    assert "vocab_size: 257" in report and "vocab_size: 8192" not in report
    assert "| run | steps | val loss |" in report and "train loss (last step)" in report


# ----------------------------------------------------------------------------- any scheme as an arm (issue 11)


def test_cli_compare_with_arms_standard_denseformer(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "cmp"
    path = tiny_yaml(max_steps=2, eval_every=2, checkpoint_every=2, probes=True)  # the smoke preset's probes
    rc = main(["compare", "--preset", "smoke", "--config", str(path), "--out", str(out), "--no-progress",
               "--arms", "standard,denseformer", "--set", "denseformer_granularity=sublayer"])
    assert rc == 0, capsys.readouterr().err
    runs = json.loads((out / "summary.json").read_text())
    assert [(r["residual"], r["steps"]) for r in runs] == [("standard", 2), ("denseformer", 2)]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["denseformer-s0", "standard-s0"]
    info = json.loads((out / "denseformer-s0" / "run.json").read_text())
    assert info["model_config"]["denseformer_granularity"] == "sublayer"
    assert [r["residual"] for r in table_rows(runs)] == ["standard", "denseformer"]
    report = (out / "report.md").read_text()
    assert "The standard residual vs denseformer, trained with" in report
    assert "| standard |" in report and "| denseformer |" in report and "| full" not in report
    assert "denseformer_granularity: \"sublayer\"" in report and "hyper_streams" not in report
    assert (out / "magnitudes.png").is_file() and "## Training dynamics" in report  # probes of both arms
    assert "--arms standard,denseformer" in capsys.readouterr().out
    # resume with one more arm and a key of its own: the finished arms (which do not read it) stay as they
    # are, the new one trains on the same terms
    before = {p.name: p.stat().st_mtime_ns for p in (out / "standard-s0" / "checkpoint").iterdir()}
    rc = main(["compare", "--preset", "smoke", "--config", str(path), "--out", str(out), "--no-progress",
               "--resume", "--arms", "standard,denseformer,hc", "--set", "denseformer_granularity=sublayer",
               "--set", "hyper_streams=2"])
    assert rc == 0, capsys.readouterr().err
    runs = json.loads((out / "summary.json").read_text())
    assert [(r["residual"], r["steps"]) for r in runs] == [("standard", 2), ("denseformer", 2), ("hc", 2)]
    assert json.loads((out / "hc-s0" / "run.json").read_text())["model_config"]["hyper_streams"] == 2
    assert "hyper_streams: 2" in (out / "report.md").read_text()
    # once an arm reads it, it is the arms' config: a resume keeps it, and changing it is refused in one line
    rc = main(["compare", "--preset", "smoke", "--config", str(path), "--out", str(out), "--no-progress",
               "--resume", "--arms", "standard,denseformer,hc"])
    assert rc == 0, capsys.readouterr().err
    assert "hyper_streams: 2" in (out / "report.md").read_text()
    rc = main(["compare", "--preset", "smoke", "--config", str(path), "--out", str(out), "--no-progress",
               "--resume", "--arms", "standard,denseformer,hc", "--set", "hyper_streams=3"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert "cannot resume with a different config: hyper_streams: the arms have 2, now 3" in err
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "standard-s0" / "checkpoint").iterdir()}


def test_cli_compare_arm_errors_are_one_line_before_anything_is_created(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "cmp"
    path = tiny_yaml(max_steps=2, eval_every=2, checkpoint_every=2)
    base = ["compare", "--preset", "smoke", "--config", str(path), "--out", str(out), "--no-progress"]
    for extra, rc_want, match in (
        (["--arms", "standard,bogus"], 2, "unknown arm 'bogus'; allowed: standard, block, full, denseformer"),
        (["--arms", "standard,standard"], 2, "arm 'standard' given twice"),
        (["--arms", "standard,denseformer", "--set", "attn_res_window=3"], 1,
         "attn_res_window=3 is a key of residual=block/full, not of the arms standard, denseformer"),
        # a value hc would take, but mhc_lite (the arm) takes at most 5 streams
        (["--arms", "standard,mhc_lite", "--set", "hyper_streams=9"], 1, "hyper_streams must be an int >= 1 and <= 5"),
    ):
        if rc_want == 2:  # a usage error: argparse exits before attnres is imported
            with pytest.raises(SystemExit) as e:
                main(base + extra)
            assert e.value.code == 2
        else:
            assert main(base + extra) == rc_want
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
        assert not out.exists()


def test_the_light_cli_default_arms_are_compares():
    import attnres_cli
    from attnres.train.compare import ARMS

    assert attnres_cli.ARMS == ARMS


def test_check_arms():
    from attnres.train.compare import check_arms

    assert check_arms(["hc", "standard"]) == ("hc", "standard")
    for bad, match in (([], "at least one arm"), (["x"], "unknown arm 'x'"), (["hc", "hc"], "given twice")):
        with pytest.raises(ConfigError, match=match):
            check_arms(bad)
