"""Plots write real PNGs atomically; depth_weight_matrix pads ragged reads with NaN."""

import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from attnres.analysis import (  # noqa: E402
    collect_probes,
    depth_weight_matrix,
    plot_depth_weights,
    plot_grad_norms,
    plot_losses,
    plot_magnitudes,
)

from ._tiny import randomize_attnres, tiny_model, token_ids  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def probes():
    out = {}
    for residual in ("standard", "full", "block"):
        model = tiny_model(residual, layers=2, block_size=2)
        randomize_attnres(model)
        out[residual] = collect_probes(model, token_ids())
    return out


def _metrics(offset: float, steps: int = 60):
    rows = []
    for s in range(steps):
        loss = 4.0 * math.exp(-s / 20) + 2 + offset
        rows.append({"step": s, "train_loss": loss, "lr": 1e-3, "tokens": 64 * s})
        if s % 10 == 0:
            rows.append({"step": s, "val_loss": 4.0 * math.exp(-s / 20) + 2.1 + offset})
    return rows


def _assert_only_png(dirpath, names):
    assert sorted(p.name for p in dirpath.iterdir()) == sorted(names)  # no temp files left behind
    for name in names:
        data = (dirpath / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def test_depth_weight_matrix_pads_ragged_rows_with_nan():
    m = depth_weight_matrix([[1.0], [0.25, 0.75], None, [0.1, 0.2, 0.7]])
    assert m.shape == (4, 3)
    np.testing.assert_array_equal(m[0, :1], [1.0])
    assert np.isnan(m[0, 1:]).all()
    np.testing.assert_array_equal(m[1, :2], [0.25, 0.75])
    assert np.isnan(m[1, 2])
    assert np.isnan(m[2]).all()
    np.testing.assert_array_equal(m[3], [0.1, 0.2, 0.7])


def test_depth_weight_matrix_of_probes_is_lower_triangular(probes):
    m = depth_weight_matrix(probes["full"]["depth_weights"])
    assert m.shape == (5, 5)
    assert np.isnan(m[np.triu_indices(5, k=1)]).all()
    assert np.isfinite(m[np.tril_indices(5)]).all()
    np.testing.assert_allclose(np.nansum(m, axis=1), 1.0, atol=1e-5)


def test_depth_weight_matrix_rejects_standard_probes():
    with pytest.raises(ValueError, match="standard"):
        depth_weight_matrix(None)


def test_probe_plots_write_png_files_and_no_temp_files(tmp_path, probes):
    plot_magnitudes(probes, tmp_path / "magnitudes.png")
    plot_grad_norms(probes, tmp_path / "grad_norms.png")
    plot_depth_weights(probes["full"], tmp_path / "full.png", "Full AttnRes")
    plot_depth_weights(probes["block"], tmp_path / "block.png", "Block AttnRes, S = 2")
    _assert_only_png(tmp_path, ["magnitudes.png", "grad_norms.png", "full.png", "block.png"])


def test_plot_overwrites_an_existing_file_in_place(tmp_path, probes):
    path = tmp_path / "magnitudes.png"
    path.write_bytes(b"old")
    plot_magnitudes(probes, path)
    _assert_only_png(tmp_path, ["magnitudes.png"])


def test_plot_creates_missing_directories(tmp_path, probes):
    plot_grad_norms(probes, tmp_path / "a" / "b" / "g.png")
    _assert_only_png(tmp_path / "a" / "b", ["g.png"])


def test_plot_losses_writes_a_png_with_train_and_val_curves(tmp_path):
    runs = [{"label": "standard", "metrics": _metrics(0.0)}, {"label": "block", "metrics": _metrics(-0.05)}]
    plot_losses(runs, tmp_path / "loss.png")
    _assert_only_png(tmp_path, ["loss.png"])


def test_plot_losses_skips_non_finite_and_missing_values(tmp_path):
    rows = _metrics(0.0) + [{"step": 61, "train_loss": float("nan")}, {"step": 62}, {"val_loss": 3.0}]
    runs = [{"label": "a", "metrics": rows}, {"label": "train only", "metrics": _metrics(0.1)[::2]},
            {"label": "empty", "metrics": []}]
    plot_losses(runs, tmp_path / "loss.png")
    _assert_only_png(tmp_path, ["loss.png"])


def test_plot_depth_weights_rejects_standard_probes(tmp_path, probes):
    with pytest.raises(ValueError, match="standard"):
        plot_depth_weights(probes["standard"], tmp_path / "x.png", "standard")
    assert list(tmp_path.iterdir()) == []


def test_plot_depth_weights_handles_a_final_read_without_weights(tmp_path):
    model = tiny_model("full", layers=2, attn_res_final_aggregation=False)
    plot_depth_weights(collect_probes(model, token_ids()), tmp_path / "w.png", "no final aggregation")
    _assert_only_png(tmp_path, ["w.png"])


def _capture_figures(monkeypatch):
    """Keep each saved figure's layout engine and titles (the real _save still writes the PNG)."""
    import attnres.analysis.plots as plots

    seen = []
    save = plots._save

    def keep(fig, path):
        seen.append({
            "layout": type(fig.get_layout_engine()).__name__,
            "suptitle": fig._suptitle.get_text() if fig._suptitle is not None else None,
            "titles": [ax.get_title() for ax in fig.axes if ax.get_title()],
            "xlabels": [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()],
        })
        save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return seen


def test_every_figure_uses_constrained_layout_so_titles_do_not_overlap(tmp_path, probes, monkeypatch):
    seen = _capture_figures(monkeypatch)
    plot_losses([{"label": "a", "metrics": _metrics(0.0)}], tmp_path / "loss.png")
    plot_magnitudes(probes, tmp_path / "m.png")
    plot_grad_norms(probes, tmp_path / "g.png")
    plot_depth_weights(probes["block"], tmp_path / "w.png", "block AttnRes depth weights (seed 0)")
    assert [s["layout"] for s in seen] == ["ConstrainedLayoutEngine"] * 4
    weights = seen[-1]
    assert weights["suptitle"] == "block AttnRes depth weights (seed 0)"
    assert weights["titles"][:2] == ["pre-attention", "pre-MLP"] and "source" in weights["xlabels"]
    assert all(s["titles"] for s in seen)


def test_plot_losses_without_curves_has_no_legend_warning(tmp_path, recwarn):
    plot_losses([{"label": "empty", "metrics": []}], tmp_path / "loss.png")
    assert not [w for w in recwarn if "legend" in str(w.message)]
