"""``python -m benchmarks pipeline``: its tables come from the routing table, and the section formats
without running the (2-process, timed) part, which is stubbed here."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import pipeline as bench


def test_paper_rows_are_the_layout_counts():
    rows = {(r["P"], r["V"], r["Np"]): r for r in bench.paper_rows()}
    r = rows[(4, 2, 1)]
    assert r["hops"]["naive"] == [2, 3, 4, 5, 6, 7, 8]
    assert r["hops"]["paper"] == [2, 3, 4, 4, 4, 4, 4]  # Megatron's widths for P=4, V=2
    assert r["sum"]["paper"] == r["eq8"] + 3 and r["sum"]["naive"] == r["eq7"] + 7
    assert r["peak"] == {"naive": 8, "paper": 4, "cached": 4}


@pytest.mark.parametrize(("xs", "text"), [([2, 3, 4], "2,3,4"), (list(range(2, 33)), "2..32"),
                                           ([2, 3, 4, 5, 6, 7, 8] + [7] * 24, "2..8, 7 x24"),
                                           ([3, 5, 7] + [7] * 13, "3..7 (+2), 7 x13"), ([5] * 9, "5 x9")])
def test_span(xs, text):
    assert bench._span(xs) == text


def test_section_formats(monkeypatch):
    arms = {bench._arm(r, c): [0.1, 0.12] for r, c in bench.ARMS}
    fake = {"one_process_s": [0.2, 0.3], "steps_s": arms, "transfer_s": arms}
    monkeypatch.setattr(bench, "measure", lambda cfg: fake)
    args = argparse.Namespace(quick=True, pp_schedule="DualPipeV", pp_virtual=2, pp_microbatches=4, repeats=2, seed=0)
    res = bench.run(args, "cpu")
    md = bench.to_markdown(res)
    assert "Eq.7 + (C-1)" in md and "block/cache" in md and "block/1 process" in md
    assert "local" in md  # DualPipeV's turn is a rank-local hop
    block = {(r["residual"], r["cache"]): r for r in res["layouts"]}
    assert block[("block", True)]["sum_bytes_per_step"] < block[("block", False)]["sum_bytes_per_step"]
