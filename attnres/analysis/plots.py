"""Figures for training runs and probes: losses (PAPER Fig. 5a), magnitudes (5b), gradients (5c),
depth-attention weights (Fig. 8).

matplotlib is imported inside the functions with the Agg backend, so importing attnres never needs
it. Every figure is written to a temp file beside ``path`` and renamed, at dpi 100.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from .probes import depth_weight_matrix

DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    """savefig to a temp file in the target directory, then os.replace (atomic on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        _plt().close(fig)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _ema(values: np.ndarray, window: float) -> np.ndarray:
    """Debiased exponential moving average with an effective window of ``window`` points."""
    if window <= 1 or len(values) < 2:
        return values
    beta = 1.0 - 1.0 / window
    out = np.empty_like(values)
    acc = 0.0
    for i, v in enumerate(values):
        acc = beta * acc + (1 - beta) * v
        out[i] = acc / (1 - beta ** (i + 1))
    return out


def _colors(n: int):
    plt = _plt()
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return [cycle[i % len(cycle)] for i in range(n)]


def _loss_series(run: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train steps, train losses, val steps, val losses) of one run, finite points only, by step."""
    rows = run.get("metrics") or []
    out = []
    for key in ("train_loss", "val_loss"):
        pts = sorted((r["step"], r[key]) for r in rows if _finite(r.get(key)) and _finite(r.get("step")))
        out += [np.asarray([p[i] for p in pts], dtype=np.float64) for i in (0, 1)]
    return tuple(out)


def plot_losses(runs: list[dict], path) -> None:
    """Train loss (raw, faint, and smoothed) and validation loss against step, one color per run.

    ``runs``: ``[{"label": str, "metrics": [row, ...]}]``; a row with a finite ``train_loss`` is a train
    point, one with a finite ``val_loss`` an eval point (a row may be both); other keys are ignored.
    Left panel: the whole run; right panel: the second half of the steps, zoomed in on the y axis so
    small gaps between schemes stay visible.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    series = [_loss_series(run) for run in runs]
    last_step = max((float(s.max()) for ser in series for s in (ser[0], ser[2]) if s.size), default=0.0)
    for ax, start in zip(axes, (0.0, 0.5 * last_step), strict=True):
        lo, hi = math.inf, -math.inf
        for run, (ts, tl, vs, vl), color in zip(runs, series, _colors(len(runs)), strict=True):
            label = str(run.get("label", "?"))
            if ts.size:
                smooth = _ema(tl, max(1.0, len(tl) / 25))
                keep = ts >= start
                ax.plot(ts[keep], tl[keep], color=color, alpha=0.2, linewidth=0.7)
                ax.plot(ts[keep], smooth[keep], color=color, linewidth=1.6, label=f"{label} train")
                if keep.any():
                    lo, hi = min(lo, smooth[keep].min()), max(hi, smooth[keep].max())
            if vs.size:
                keep = vs >= start
                ax.plot(vs[keep], vl[keep], color=color, linestyle="--", marker="o", markersize=3.5,
                        linewidth=1.2, label=f"{label} val")
                if keep.any():
                    lo, hi = min(lo, vl[keep].min()), max(hi, vl[keep].max())
        if math.isfinite(lo) and math.isfinite(hi):  # fit the smoothed and val curves, not raw spikes
            pad = 0.05 * max(hi - lo, 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0].set_title("Loss (train smoothed, val dashed)")
    axes[1].set_title("Second half, zoomed")
    if axes[0].get_legend_handles_labels()[0]:  # no legend (and no warning) without any curve
        axes[0].legend(fontsize=8)
    _save(fig, path)


def _block_bounds(probes: dict[str, dict]) -> list[int]:
    """Sublayer indices where a block starts, when exactly one distinct block size > 1 is probed."""
    sizes = {p.get("block_size") for p in probes.values()} - {None, 1}
    if len(sizes) != 1:
        return []
    size = sizes.pop()
    n = max(len(p["output_rms"]) for p in probes.values())
    return list(range(size, n, size))


def _depth_lines(ax, probes: dict[str, dict], key: str, offset: int = 0) -> None:
    for (label, p), color in zip(probes.items(), _colors(len(probes)), strict=True):
        y = np.asarray(p[key], dtype=np.float64)
        ax.plot(np.arange(len(y)) + offset, y, color=color, marker="o", markersize=3, linewidth=1.3,
                label=label)
    for b in _block_bounds(probes):
        ax.axvline(b - 0.5, color="0.6", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_magnitudes(probes: dict[str, dict], path) -> None:
    """Sublayer output RMS and hidden-state RMS against depth, log scale, one line per label (Fig. 5b)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    _depth_lines(a, probes, "output_rms")
    a.set_xlabel("sublayer (2i = attention, 2i+1 = MLP of layer i)")
    a.set_ylabel("RMS of sublayer output")
    a.set_title("Output magnitude")
    _depth_lines(b, probes, "hidden_rms")
    b.set_xlabel("read point (last = final output)")
    b.set_ylabel("RMS of hidden state before PreNorm")
    b.set_title("Hidden-state magnitude")
    _save(fig, path)


def plot_grad_norms(probes: dict[str, dict], path) -> None:
    """Gradient norm of each sublayer's weights against depth, log scale (Fig. 5c)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    _depth_lines(ax, probes, "grad_norm")
    ax.set_xlabel("sublayer (2i = attention, 2i+1 = MLP of layer i)")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title("Gradient magnitude")
    _save(fig, path)


def plot_depth_weights(probes: dict, path, title: str) -> None:
    """Heatmaps of mean depth-attention weights, as PAPER Fig. 8.

    Two panels: pre-attention reads (even read points) and pre-MLP reads (odd), rows = decoder layer,
    columns = sources (0 = embedding; Full: j = output of sublayer j-1 counted from 0, i.e. the j-th
    sublayer; Block: j = block j, completed or partial). The final-output read is the last row of both
    panels, below a separating line. Cells a read cannot see are blank (NaN).
    """
    dw = probes.get("depth_weights")
    if dw is None:
        raise ValueError("probes have no depth_weights (standard residual): nothing to plot")
    mat = depth_weight_matrix(dw)
    num_sublayers = len(dw) - 1
    attn_rows = list(range(0, num_sublayers, 2))
    mlp_rows = list(range(1, num_sublayers, 2))
    vmax = float(np.nanmax(mat)) if np.isfinite(mat).any() else 1.0

    plt = _plt()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    width = mat.shape[1]
    height = max(2.8, 0.32 * (len(attn_rows) + 1) + 1.4)
    # constrained layout makes room for the suptitle above the panel titles (without it they overlap)
    fig, axes = plt.subplots(
        1, 2, figsize=(min(4 + 0.42 * width, 18), height + 0.4), squeeze=False, layout="constrained"
    )
    im = None
    for ax, rows, name in zip(axes[0], (attn_rows, mlp_rows), ("pre-attention", "pre-MLP"), strict=True):
        sub = mat[rows + [num_sublayers]]
        im = ax.imshow(sub, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_yticks(range(len(rows) + 1))
        ax.set_yticklabels([f"L{r // 2}" for r in rows] + ["final"], fontsize=7)
        ax.axhline(len(rows) - 0.5, color="white", linewidth=2)
        step = max(1, width // 16)
        ticks = list(range(0, width, step))
        ax.set_xticks(ticks)
        ax.set_xticklabels(["emb" if t == 0 else str(t) for t in ticks], fontsize=7)
        ax.set_xlabel("source")
        if width <= 12 and sub.shape[0] <= 12:
            for (r, c), v in np.ndenumerate(sub):
                if np.isfinite(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 * vmax else "white")
    axes[0, 0].set_ylabel("read (layer)")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.04, label="mean weight")
    fig.suptitle(title, fontsize=11)
    _save(fig, path)
