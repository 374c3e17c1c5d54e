"""Smoke test of the benchmark suite: `python -m benchmarks all --quick` writes every section, with finite numbers.

No timing is asserted (speed is measured in benchmarks, not tests); this only holds that the suite runs
end to end and its results file is complete.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("op", "step", "memory", "decode")


def _numbers(x):
    """Every number in a JSON value (bools excluded)."""
    if isinstance(x, bool):
        return
    if isinstance(x, int | float):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # --no-fla-download: CI may be offline; fla's naive is then reported unavailable, with a reason.
    # --threads 1: a smoke run of tiny ops on a busy 2-core machine is slowest with spinning thread pools.
    cmd = [sys.executable, "-m", "benchmarks", "all", "--quick", "--no-fla-download"]
    cmd += ["--device", "cpu", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_quick_run_writes_every_section_with_finite_numbers(quick_results):
    res, md = quick_results
    assert set(SECTIONS) <= set(res["sections"])
    for name in SECTIONS:
        sec = res["sections"][name]
        assert sec["rows"], f"{name} has no rows"
        nums = list(_numbers(sec["rows"]))
        assert nums and all(math.isfinite(v) for v in nums), f"{name}: non-finite number in rows"
        assert f"## {name}" in md
    for key in ("cpu_model", "cpu_cores", "torch", "python", "attnres", "command"):
        assert res["machine"].get(key) is not None, key


def test_every_variant_is_timed_or_says_why_not(quick_results):
    op = quick_results[0]["sections"]["op"]
    for name, meta in op["variants"].items():
        rows = [r for r in op["rows"] if r["variant"] == name]
        if meta["available"]:
            assert rows and all(r["status"] == "ok" and r["time_ms"] > 0 for r in rows), name
        else:
            assert meta["reason"], f"{name} unavailable without a reason"
            assert name not in {r["variant"] for r in op["rows"] if "time_ms" in r}


def test_quick_run_times_all_three_residuals(quick_results):
    secs = quick_results[0]["sections"]
    for name in ("memory", "decode"):
        assert {r["residual"] for r in secs[name]["rows"]} == {"standard", "full", "block"}, name
    assert {r["residual"] for r in secs["step"]["rows"]} == {"standard", "full", "block", "block-no-two-phase"}
    assert all(r["tokens_per_s"] > 0 for r in secs["step"]["rows"])
    assert all(r["saved_bytes_activations"] > 0 for r in secs["memory"]["rows"])


def test_variants_agree_on_the_read(quick_results):
    """The benchmarked variants compute the same read (else the speedups compare different things)."""
    for r in quick_results[0]["sections"]["op"]["rows"]:
        if "max_abs_diff_vs_ours" in r:
            assert r["max_abs_diff_vs_ours"] < 1e-3, r


# ---- issue 13: shapes, dtypes and modes of step and decode ------------------------------------------------------

STEP_ARMS = {"standard", "full", "block", "block-no-two-phase"}


@pytest.fixture(scope="module")
def step_matrix(tmp_path_factory):
    """The step benchmark at two tiny shapes, fp32 and bf16, eager and compiled (aot_eager: no code generation,
    so the smoke run stays in seconds), one round."""
    out = tmp_path_factory.mktemp("step")
    cmd = [sys.executable, "-m", "benchmarks", "step", "--shapes", "64x2x64x1,128x3x64", "--batch", "2"]
    cmd += ["--dtypes", "fp32,bf16", "--modes", "eager,compiled", "--compile-backend", "aot_eager"]
    cmd += ["--repeats", "1", "--warmup", "0", "--device", "cpu", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "step.json").read_text()), (out / "step.md").read_text(), proc.stdout, out


def test_step_times_every_arm_dtype_mode_and_shape(step_matrix):
    res, md, stdout, out = step_matrix
    sec = res["sections"]["step"]
    got = {(r["shape"], r["residual"], r["dtype"], r["mode"]) for r in sec["rows"]}
    shapes = ["d64xL2 1x64", "d128xL3 2x64"]  # the second takes --batch
    want = {(s, a, d, m) for s in shapes for a in STEP_ARMS for d in ("fp32", "bf16") for m in ("eager", "compiled")}
    assert got == want and len(sec["rows"]) == len(want)
    for r in sec["rows"]:
        assert r["time_ms"] > 0 and math.isfinite(r["first_loss"]), r
        assert r["time_vs_standard_min"] <= r["time_vs_standard"] <= r["time_vs_standard_max"], r
        if r["residual"] == "standard":
            assert r["time_vs_standard"] == 1.0
    assert set(sec["headline"]) == {f"{s}/{d}/{m}/{a}" for s, a, d, m in want if a != "standard"}
    # the arms' configs: N = 8 blocks, two-phase off in its arm only, the shape's model
    for s in sec["shapes"]:
        arms = s["arms"]
        assert set(arms) == STEP_ARMS
        assert arms["block-no-two-phase"]["attn_res_two_phase"] is False
        assert "attn_res_two_phase" not in arms["block"] and arms["block"]["attn_res_num_blocks"] == 8
        assert arms["full"]["block_size"] == 1
    d128 = next(s for s in sec["shapes"] if s["shape"] == "d128xL3 2x64")["arms"]["block"]
    assert (d128["hidden_size"], d128["num_hidden_layers"], d128["block_size"]) == (128, 3, 1)
    assert sec["compile"] == {"backend": "aot_eager", "mode": "default"}
    # the markdown: one summary line per shape x dtype x mode with every non-standard arm, and the arms table
    for s in shapes:
        for d in ("fp32", "bf16"):
            for m in ("eager", "compiled"):
                assert f"| {s} | {d} | {m} | " in md
    assert "| full | block | block-no-two-phase |" in md and "**Arms**" in md
    for key in ("cpu_model", "torch_threads", "torch", "transformers", "git_revision", "command"):
        assert res["machine"].get(key) is not None, key
    assert "round 1/1" in stdout  # progress is printed per round
    assert (out / "step.partial.json").exists()  # written after each shape


def test_step_uncarried_arm_runs_the_same_models_uncarried(tmp_path):
    """--uncarried-arm: full-uncarried and block-uncarried in every mode, compiled into graphs of their own (the
    carry flag is guarded), the same function as full and block (the same first loss)."""
    cmd = [sys.executable, "-m", "benchmarks", "step", "--shapes", "64x2x64x1", "--dtypes", "fp32", "--modes",
           "eager,compiled", "--compile-backend", "aot_eager", "--uncarried-arm", "--no-two-phase-arm",
           "--repeats", "1", "--warmup", "0", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sec = json.loads((tmp_path / "step.json").read_text())["sections"]["step"]
    rows = {(r["residual"], r["mode"]): r for r in sec["rows"]}
    assert set(rows) == {(a, m) for a in ("standard", "full", "block", "full-uncarried", "block-uncarried")
                         for m in ("eager", "compiled")}
    assert rows["full-uncarried", "compiled"]["graphs_compiled_in_first_steps"] > 0
    assert sec["shapes"][0]["graphs_compiled_while_timing"] == 0
    for arm in ("full", "block"):
        for mode in ("eager", "compiled"):
            assert rows[f"{arm}-uncarried", mode]["first_loss"] == pytest.approx(rows[arm, mode]["first_loss"],
                                                                                 rel=1e-6)


def test_step_traced_arm_compiles_its_own_graphs(tmp_path):
    """--traced-arm: full-traced and block-traced in compiled mode only, with graphs of their own (the flag
    is guarded), none compiled while timing; --aa-arm: a second, identical standard model in every mode."""
    cmd = [sys.executable, "-m", "benchmarks", "step", "--shapes", "64x2x64x1", "--dtypes", "fp32", "--modes",
           "eager,compiled", "--compile-backend", "aot_eager", "--traced-arm", "--aa-arm", "--no-two-phase-arm",
           "--repeats", "1",
           "--warmup", "0", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sec = json.loads((tmp_path / "step.json").read_text())["sections"]["step"]
    got = {(r["residual"], r["mode"]) for r in sec["rows"]}
    assert got == {(a, m) for a in ("standard", "full", "block", "standard-aa") for m in ("eager", "compiled")} | {
        ("full-traced", "compiled"), ("block-traced", "compiled")}
    assert all(r["graphs_compiled_in_first_steps"] > 0 for r in sec["rows"] if r["residual"].endswith("traced"))
    assert sec["shapes"][0]["graphs_compiled_while_timing"] == 0
    md = (tmp_path / "step.md").read_text()
    assert "| full | block | standard-aa | full-traced | block-traced |" in md and "| eager | " in md and " — " in md
    aa = [r for r in sec["rows"] if r["residual"] == "standard-aa"]
    assert all(r["first_loss"] == next(b["first_loss"] for b in sec["rows"] if b["residual"] == "standard"
                                        and b["mode"] == r["mode"]) for r in aa)  # the same model


def test_decode_covers_every_residual_dtype_and_batch(quick_results):
    sec = quick_results[0]["sections"]["decode"]
    got = {(r["residual"], r["dtype"], r["batch"]) for r in sec["rows"]}
    assert got == {(a, d, b) for a in ("standard", "full", "block") for d in ("fp32", "bf16") for b in (1, 8)}
    assert all(r["tokens_per_s"] > 0 and r["cache"] == "dynamic" for r in sec["rows"])
    for cfg in sec["shapes"][0]["arms"].values():
        assert cfg["weights"] in ("fp32", "bf16")


def _main():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.__main__ import main

    return main


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["step", "--shapes", "768x12"], ["'768x12'", "HIDDENxLAYERSxSEQ[xBATCH]"]),
        (["step", "--shapes", "768x12x0"], ["'768x12x0'", "positive integers"]),
        (["step", "--shapes", "100x2x64"], ["multiple of 64"]),
        (["step", "--shapes", "256x8x256,256x8x256"], ["twice"]),
        (["step", "--dtypes", "fp16"], ["'fp16'", "fp32, bf16"]),
        (["step", "--dtypes", ""], ["fp32, bf16"]),
        (["step", "--modes", "jit"], ["'jit'", "eager, compiled"]),
        (["step", "--modes", "compiled", "--compile-mode", "none"], ["--modes must then include eager"]),
        (["step", "--arms", "block:lr=0.1"], ["lr is not a model key"]),
        (["step", "--arms", "nope"], ["unknown scheme 'nope'", "standard"]),
        (["step", "--warmup", "-1"], ["--warmup must be >= 0"]),
        (["step", "--traced-arm", "--modes", "eager"], ["--traced-arm needs the compiled mode"]),
        (["step", "--inductor-option", "no_such_knob=1"], ["'no_such_knob' is not an option", "torch._inductor"]),
        (["step", "--inductor-option", "reorder_for_peak_memory"], ["expected KEY=VALUE"]),
        (["step", "--inductor-option", "reorder_for_peak_memory=0"], ["takes a bool", "'0'"]),
        (["step", "--inductor-option", "reorder_for_peak_memory=False", "--modes", "eager"],
         ["needs the compiled mode"]),
        (["step", "--inductor-option", "reorder_for_peak_memory=False", "--compile-mode", "max-autotune"],
         ["options or a mode"]),
        (["decode", "--decode-dtypes", "fp8"], ["'fp8'", "fp32, bf16"]),
        (["decode", "--decode-shapes", "768x12x512"], ["HIDDENxLAYERS"]),
        (["decode", "--decode-batches", "0"], ["positive"]),
        (["all", "--dtypes", "int8"], ["'int8'", "fp32, bf16"]),  # checked before the op section runs
        (["memory", "--shapes", "768x12x512"], ["--shapes belong to the step benchmark"]),
    ],
)
def test_bad_options_are_one_line_errors_naming_what_is_allowed(argv, says, tmp_path):
    with pytest.raises(SystemExit) as e:
        _main()([*argv, "--device", "cpu", "--out", str(tmp_path)])
    msg = str(e.value.code)
    assert "\n" not in msg and all(s in msg for s in says), msg
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_issue13_presets_name_the_shapes_the_issue_asks_for():
    _main()  # puts the repository on sys.path
    from benchmarks import decode, step
    from benchmarks.__main__ import build_parser

    args = build_parser().parse_args(["step", "--shapes", "issue13"])
    shapes = {(s["hidden"], s["layers"], s["seq"]) for s in step.resolve(args)["shapes"]}
    assert {(256, 8, 256), (768, 12, 512), (768, 12, 2048), (1024, 16, 1024), (1024, 16, 2048)} == shapes
    assert step.resolve(args)["dtypes"] == ["fp32", "bf16"] and step.resolve(args)["modes"] == ["eager", "compiled"]
    args = build_parser().parse_args(["decode", "--decode-shapes", "issue13"])
    assert [(s["hidden"], s["layers"]) for s in decode.resolve(args)["shapes"]] == [(256, 8), (768, 12), (1024, 16)]
    assert args.decode_batches == [1, 8] and decode.resolve(args)["dtypes"] == ["fp32", "bf16"]


def test_median_interval_is_the_binomial_order_statistic_interval():
    """95 % distribution-free interval of the median: ranks from the binomial tail, computed here by hand."""
    _main()
    from benchmarks.common import median_interval, verdict

    # n = 9: P(Binom(9, 1/2) <= 1) = 10/512, coverage 0.961; with rank 3 it would be 1 - 2 * 46/512 = 0.82
    assert median_interval([9, 1, 8, 2, 7, 3, 6, 4, 5]) == (2, 8)
    # n = 21: P(<= 5) = 0.0133 (coverage 0.973), P(<= 6) = 0.0392 (0.922)
    assert median_interval(list(range(21))) == (5, 15)
    assert all(math.isnan(x) for x in median_interval([1.0, 2.0, 3.0, 4.0, 5.0]))  # best pair covers 0.94
    assert verdict(1.04, 1.05, (0.98, 1.07)) == "met (unresolved)"
    assert verdict(1.04, 1.05, (1.01, 1.045)) == "met"
    assert verdict(1.06, 1.05, (1.055, 1.08)) == "missed"
    assert verdict(1.06, 1.05, (math.nan, math.nan)) == "missed"


@pytest.mark.parametrize("n", range(1, 8))
def test_balanced_orders_give_every_variant_every_position_and_predecessor_alike(n):
    """Williams' design: over one cycle each index sits at each position equally often and directly follows each
    other index equally often (a rotated order would give every index one fixed predecessor)."""
    _main()
    from collections import Counter
    from itertools import pairwise

    from benchmarks.common import balanced_orders

    rows = balanced_orders(n)
    assert len(rows) == (2 * n if n % 2 and n > 1 else n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    positions = Counter((i, x) for row in rows for i, x in enumerate(row))
    assert set(positions.values()) == {len(rows) // n}
    pairs = Counter((a, b) for row in rows for a, b in pairwise(row))
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) <= 1


def test_interleaved_keeps_groups_together_in_balanced_orders():
    """Every name once a round; the names of one group consecutive; within a group each name after each other
    equally often over the rounds."""
    _main()
    from collections import Counter
    from itertools import pairwise

    from benchmarks.common import interleaved

    calls = []
    names = [f"{arm}/{mode}" for mode in ("eager", "compiled") for arm in ("standard", "full", "block", "aa")]
    fns = {name: (lambda name=name: calls.append(name)) for name in names}
    times = interleaved(fns, repeats=8, warmup=0, group=lambda key: key.split("/")[1])
    assert {k: len(v) for k, v in times.items()} == dict.fromkeys(names, 8)
    rounds = [calls[i:i + 8] for i in range(0, 64, 8)]
    assert all(sorted(r) == sorted(names) for r in rounds)
    assert all(len({k.split("/")[1] for k in r[:4]}) == 1 for r in rounds)
    pairs = Counter((a, b) for r in rounds for a, b in pairwise(r) if a.split("/")[1] == b.split("/")[1])
    assert set(pairs.values()) == {2} and len(pairs) == 2 * 4 * 3


def test_inductor_options_reach_torch_compile(monkeypatch):
    """--inductor-option: parsed as literals (nested keys too) and handed to torch.compile(options=...); without
    it torch.compile gets no options."""
    _main()
    from benchmarks import step
    from benchmarks.__main__ import build_parser

    args = build_parser().parse_args(["step", "--modes", "compiled", "--inductor-option",
                                      "reorder_for_peak_memory=False", "--inductor-option",
                                      "cpp.max_horizontal_fusion_size=4"])
    step.resolve(args)
    assert args._inductor_options == {"reorder_for_peak_memory": False, "cpp.max_horizontal_fusion_size": 4}
    seen = {}
    monkeypatch.setattr(step.torch, "compile", lambda model, **kw: seen.update(kw) or model)
    step._compile("model", args)
    assert seen == {"backend": "inductor", "options": args._inductor_options}
    plain = build_parser().parse_args(["step", "--modes", "compiled"])
    step.resolve(plain)
    seen.clear()
    step._compile("model", plain)
    assert seen == {"backend": "inductor"}
