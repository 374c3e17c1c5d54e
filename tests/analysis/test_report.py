"""summarize_dynamics and its statistics measure what they say."""

import pytest

from attnres.analysis import collect_probes, depth_weight_stats, dynamics_stats, summarize_dynamics

from ._tiny import tiny_model, token_ids


def _probe(output_rms, grad_norm, depth_weights=None, hidden_rms=None):
    n = len(output_rms)
    return {"output_rms": output_rms, "grad_norm": grad_norm, "depth_weights": depth_weights,
            "hidden_rms": hidden_rms or [1.0] * (n + 1), "loss": 3.0}


def test_dynamics_stats_ratios_are_last_over_first_and_max_over_min():
    s = dynamics_stats(_probe([1.0, 2.0, 4.0, 8.0], [8.0, 4.0, 2.0, 1.0], hidden_rms=[1, 2, 3, 4, 5.0]))
    assert s["output_growth"] == 8.0
    assert s["output_max_over_min"] == 8.0
    assert s["hidden_growth"] == 5.0
    assert s["grad_max_over_min"] == 8.0
    assert s["grad_first_over_last"] == pytest.approx(6.0 / 1.5)  # mean of layer 0 over mean of layer 1
    assert s["embedding"] is None and s["predecessor"] is None


def test_depth_weight_stats_take_source_zero_and_the_last_source():
    # 2 sublayers: reads 0 (attn), 1 (MLP), 2 (final); read 0 has no choice and is left out
    dw = [[1.0], [0.3, 0.7], [0.5, 0.1, 0.4]]
    s = depth_weight_stats(dw)
    assert s["embedding"] == pytest.approx((0.3 + 0.5) / 2)
    assert s["predecessor"] == pytest.approx((0.7 + 0.4) / 2)
    assert s["uniform_predecessor"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert s["embedding_mlp"] == pytest.approx(0.3)
    assert s["predecessor_mlp"] == pytest.approx(0.7)
    assert s["embedding_attn"] is None  # the only pre-attention read has one source
    assert s["final_embedding"] == pytest.approx(0.5)


def test_zero_init_full_model_puts_uniform_weight_on_the_predecessor():
    s = dynamics_stats(collect_probes(tiny_model("full", layers=2), token_ids()))
    assert s["predecessor"] == pytest.approx(s["uniform_predecessor"], abs=1e-6)
    assert s["embedding"] == pytest.approx(s["uniform_predecessor"], abs=1e-6)


def test_summary_has_a_table_row_per_scheme_and_weight_sentences_only_for_attnres():
    probes = {
        "baseline": _probe([1.0, 2.0, 4.0, 8.0], [8.0, 4.0, 2.0, 1.0]),
        "attnres": _probe([1.0, 1.5, 1.0, 1.5], [2.0, 2.0, 2.0, 2.0],
                          [[1.0], [0.2, 0.8], [0.3, 0.3, 0.4], [0.1, 0.1, 0.1, 0.7], [0.25] * 5]),
    }
    text = summarize_dynamics(probes)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 3  # header + one row per scheme
    assert table[1].startswith("| baseline | 3.000 | 8.00 |")
    assert table[2].startswith("| attnres | 3.000 | 1.50 |")
    assert "8.0× under `baseline`" in text and "1.5× under `attnres`" in text
    assert "`attnres` depth attention" in text
    assert "`baseline` depth attention" not in text


def test_summary_of_nothing_says_so():
    assert "No probes" in summarize_dynamics({})


def test_summarize_dynamics_labels_the_loss_column_as_the_probe_batch_loss():
    text = summarize_dynamics({"standard": _probe([1.0, 2.0], [2.0, 1.0])})
    header = text.splitlines()[0]
    assert "| probe-batch loss |" in header and "| loss |" not in header
    assert "| standard | 3.000 |" in text
    assert "not the validation loss" in text
