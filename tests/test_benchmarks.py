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
    for name in ("step", "memory", "decode"):
        assert {r["residual"] for r in secs[name]["rows"]} == {"standard", "full", "block"}, name
    assert all(r["tokens_per_s"] > 0 for r in secs["step"]["rows"])
    assert all(r["saved_bytes_activations"] > 0 for r in secs["memory"]["rows"])


def test_variants_agree_on_the_read(quick_results):
    """The benchmarked variants compute the same read (else the speedups compare different things)."""
    for r in quick_results[0]["sections"]["op"]["rows"]:
        if "max_abs_diff_vs_ours" in r:
            assert r["max_abs_diff_vs_ours"] < 1e-3, r
