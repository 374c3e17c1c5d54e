"""scaling: cooldown branches equal fresh WSD runs, rerun skips what is done, the fits against known curves,
the multiplier's interpolation rule, bad input."""

import json
import math

import numpy as np
import pytest

from attnres.analysis import scaling_law as law
from attnres.train import train
from attnres.train.ablate import parse_arm, t_quantile
from attnres.train.config import ConfigError
from attnres.train.loop import prepare
from attnres.train.scaling import Ladder, Size, parse_size, run_unit, scaling, unit_config

SMALL = dict(warmup_steps=1, eval_batches=2, checkpoint_every=100)


# ----------------------------------------------------------------------------- the fits


def test_power_law_recovers_a_known_curve():
    c = np.geomspace(1e9, 1e12, 7)
    f = law.power_law(c, 3.0 * c**-0.07)
    assert f.A == pytest.approx(3.0, rel=1e-9) and f.alpha == pytest.approx(0.07, rel=1e-9)
    assert f.rmse_log < 1e-12 and (f.c_min, f.c_max) == (1e9, 1e12)
    assert f.compute_for(3.0 * 1e10**-0.07) == pytest.approx(1e10, rel=1e-9)


def test_multiplier_of_a_scheme_that_needs_half_the_compute():
    c = np.geomspace(1e9, 1e12, 7)
    base = law.power_law(c, 3.0 * c**-0.07)
    # the variant reaches at C what the baseline reaches at 2C: m = 2 wherever 2C is inside the fit
    cv = np.geomspace(1e9, 1e12, 7)
    m = law.multiplier(base, cv, 3.0 * (2 * cv) ** -0.07)
    inside = [p for p in m["points"] if p["interpolated"]]
    assert len(inside) == 6 and m["extrapolated"] == 1  # 2 x 1e12 is past the baseline's last point
    assert all(p["m"] == pytest.approx(2.0, rel=1e-9) for p in inside)
    assert math.exp(m["ln_m"]) == pytest.approx(2.0, rel=1e-9)
    # every point past the baseline's range: no multiplier, not an extrapolated one
    far = law.multiplier(base, [1e12], [3.0 * 1e14**-0.07])
    assert far["ln_m"] is None and far["extrapolated"] == 1


def test_shared_fits_recover_alpha_floor_and_multiplier():
    c = np.geomspace(1e9, 1e13, 9)
    groups = {"base": (c, 1.5 + 40.0 * c**-0.2), "v": (c, 1.5 + 20.0 * c**-0.2)}
    fl = law.floor_fit(groups, alphas=np.linspace(0.05, 0.5, 46))
    assert fl["alpha"] == pytest.approx(0.2, abs=1e-9) and fl["E"] == pytest.approx(1.5, rel=1e-6)
    assert fl["identified"] and law.shared_multiplier(fl, "base", "v") == pytest.approx(2**5, rel=1e-6)
    pure = {"base": (c, 3.0 * c**-0.07), "v": (c, 2.9 * c**-0.07)}
    s = law.shared_alpha(pure)
    assert s["alpha"] == pytest.approx(0.07, rel=1e-9)
    assert law.shared_multiplier(s, "base", "v") == pytest.approx((3.0 / 2.9) ** (1 / 0.07), rel=1e-9)


def test_floor_fit_says_when_the_floor_is_not_identified():
    c = np.geomspace(1e9, 4e9, 4)  # a narrow compute range
    fl = law.floor_fit({"a": (c, 1.5 + 40.0 * c**-0.2)}, alphas=np.linspace(0.05, 0.5, 46))
    assert not fl["identified"] and "spans only 4.0x" in fl["why"]
    noisy = 3.0 * np.geomspace(1e9, 1e12, 6) ** -0.07 * np.exp([0.01, -0.01, 0.01, -0.01, 0.01, -0.01])
    fl = law.floor_fit({"a": (np.geomspace(1e9, 1e12, 6), noisy)}, alphas=np.linspace(0.02, 1.0, 50))
    assert not fl["identified"], fl


def test_t_interval_matches_the_formula():
    xs = [math.log(1.1), math.log(1.3), math.log(1.2)]
    ci = law.t_interval(xs, t_quantile)
    mean, sd = np.mean(xs), np.std(xs, ddof=1)
    half = t_quantile(2)[0] * sd / math.sqrt(3)
    assert ci["m"] == pytest.approx(math.exp(mean)) and ci["lo"] == pytest.approx(math.exp(mean - half))
    assert ci["hi"] == pytest.approx(math.exp(mean + half)) and ci["n"] == 3
    assert law.t_interval([0.1], t_quantile)["lo"] is None and law.t_interval([], t_quantile)["m"] is None


@pytest.mark.parametrize("c, y", [([1.0], [2.0]), ([1.0, -1.0], [2.0, 2.0]), ([1.0, 2.0], [2.0, math.nan])])
def test_power_law_refuses_bad_points(c, y):
    with pytest.raises(ValueError):
        law.power_law(c, y)


# ----------------------------------------------------------------------------- sizes and ladders


def test_size_scales_the_mlp_and_keeps_heads(tiny_cfg):
    cfg = tiny_cfg(hidden_size=32, intermediate_size=88)
    assert parse_size("64", 3) == Size(64, 3) and parse_size(" 48x2 ", 3) == Size(48, 2)
    c = Size(64, 3).apply(cfg)
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size) == (64, 3, 176)
    assert c.num_attention_heads == cfg.num_attention_heads


@pytest.mark.parametrize("text", ["", "x8", "64x", "sixty", "0", "64x0"])
def test_bad_size(text):
    with pytest.raises(ConfigError, match="size"):
        parse_size(text, 2)


@pytest.mark.parametrize("rungs, frac, warmup, match", [
    ((20, 10), 0.2, 1, "ascending"), ((10, 10), 0.2, 1, "distinct"), ((), 0.2, 1, "rungs"),
    ((10, 20), 0.0, 1, "decay fraction"), ((10, 20), 0.2, 8, "warmup_steps=8 must end before"),
])
def test_bad_ladder(rungs, frac, warmup, match):
    with pytest.raises(ConfigError, match=match):
        Ladder(rungs, frac).check(warmup)


# ----------------------------------------------------------------------------- the runs


def test_cooldown_branches_equal_fresh_wsd_runs(tmp_path, tiny_cfg):
    cfg = tiny_cfg(residual="standard", **SMALL)
    ladder = Ladder((6, 12), 0.25).check(cfg.warmup_steps)
    main = unit_config(cfg, Size(cfg.hidden_size, cfg.num_hidden_layers), parse_arm("standard"), 0, ladder)
    data = prepare(main, False)
    res = run_unit(main, ladder, tmp_path / "unit", data=data)
    assert sorted(res) == [6, 12] and not any((tmp_path / "unit").glob("*/checkpoint"))
    for steps in (6, 12):
        fresh = train(main.__class__(**{**main.__dict__, "max_steps": steps}), tmp_path / f"fresh-{steps}",
                      progress=False, data=data)
        assert res[steps]["val_loss"] == fresh["val_loss"] and res[steps]["train_loss"] == fresh["train_loss"]
        lrs = [json.loads(x)["lr"] for x in (tmp_path / "unit" / f"rung-{steps}" / "metrics.jsonl").open()
               if '"lr"' in x]
        ref = [json.loads(x)["lr"] for x in (tmp_path / f"fresh-{steps}" / "metrics.jsonl").open() if '"lr"' in x]
        assert lrs == ref and len(lrs) == steps


def test_scaling_end_to_end_rerun_and_errors(tmp_path, tiny_cfg):
    cfg = tiny_cfg(**SMALL)
    out = tmp_path / "sc"
    kw = dict(sizes=["32", "48x3"], rungs=[4, 8], seeds=[0, 1], progress=False, argv=[])
    s = scaling(cfg, out, ["block"], **kw)
    assert s["arms"] == ["standard", "block"] and s["sizes"] == ["d32x2", "d48x3"]
    assert len(s["points"]) == 2 * 2 * 2 * 2 and all(p["val_loss"] is not None for p in s["points"])
    for name in ("report.md", "summary.json", "scaling.png", "flops.json"):
        assert (out / name).is_file(), name
    pairing = json.loads((out / "d48x3" / "block-s1" / "pairing.json").read_text())
    assert pairing["baseline"] == "standard" and pairing["shared"] > 0
    p = [x for x in s["points"] if x["size"] == "d48x3" and x["steps"] == 8]
    assert p[0]["compute"] == pytest.approx(s["flops"]["d48x3/standard"]["flops_per_token"] * 8 * cfg.tokens_per_step)
    m = s["multipliers"]["block"]
    assert set(m) == {"paired", "shared_alpha", "shared_floor", "per_size", "leave_one_rung_out"}
    assert "## Compute multiplier against `standard`" in (out / "report.md").read_text()
    # a second call trains nothing: every result file stays as it was
    stamps = {f: f.stat().st_mtime_ns for f in out.glob("*/*/rung-*/result.json")}
    assert len(stamps) == 16
    again = scaling(cfg, out, ["block"], **kw)
    assert {f: f.stat().st_mtime_ns for f in out.glob("*/*/rung-*/result.json")} == stamps
    assert again["points"] == s["points"]
    # another config in the same --out is refused, naming the difference
    with pytest.raises(ConfigError, match="lr"):
        scaling(tiny_cfg(**{**SMALL, "lr": 0.003}), out, ["block"], **kw)


def test_a_rung_added_below_a_finished_run_is_refused(tmp_path, tiny_cfg):
    cfg = tiny_cfg(**SMALL)
    kw = dict(sizes=["32"], seeds=[0], progress=False, argv=[], keep_checkpoints=True)
    scaling(cfg, tmp_path / "sc", ["block"], **{**kw, "rungs": [8]})
    with pytest.raises(ConfigError, match="past step"):
        scaling(cfg, tmp_path / "sc", ["block"], **{**kw, "rungs": [4, 8]})


@pytest.mark.parametrize("kw, match", [
    (dict(sizes=[]), "at least one size"), (dict(seeds=[]), "at least one seed"), (dict(jobs=0), "jobs"),
    (dict(sizes=["32", "32x2"]), "given twice"), (dict(rungs=[8, 4]), "ascending"),
])
def test_scaling_bad_arguments(tmp_path, tiny_cfg, kw, match):
    args = dict(sizes=["32"], rungs=[4, 8], seeds=[0], progress=False, argv=[])
    with pytest.raises(ConfigError, match=match):
        scaling(tiny_cfg(**SMALL), tmp_path / "sc", ["block"], **{**args, **kw})
    assert not (tmp_path / "sc").exists()


def test_worker_processes_give_the_same_results(tmp_path, tiny_cfg):
    cfg = tiny_cfg(**SMALL)
    kw = dict(sizes=["32"], rungs=[4, 8], seeds=[0], progress=False, argv=[])
    one = scaling(cfg, tmp_path / "one", ["full"], **kw)
    two = scaling(cfg, tmp_path / "two", ["full"], jobs=2, **kw)
    assert [p["val_loss"] for p in one["points"]] == [p["val_loss"] for p in two["points"]]


@pytest.mark.parametrize("argv, code, match", [
    (["scaling", "block", "--sizes", "32", "--rungs", "4,x"], 2, "comma-separated integers"),
    (["scaling", "block", "--rungs", "4,8"], 2, "--sizes"),
    (["scaling", "block", "--sizes", "32", "--rungs", "4,8", "--set", "max_steps=5"], 1, "sets 'max_steps' itself"),
    (["scaling", "blok", "--sizes", "32", "--rungs", "4,8"], 1, "unknown scheme 'blok'"),
])
def test_cli_errors(argv, code, match, capsys):
    import attnres_cli

    try:
        got = attnres_cli.main(argv)
    except SystemExit as e:
        got = e.code
    assert got == code
    assert match in capsys.readouterr().err
