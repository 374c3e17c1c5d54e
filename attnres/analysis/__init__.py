"""Training-dynamics analysis: probes, plots and markdown summaries (PAPER §5, Fig. 5 and Fig. 8).

    probes = collect_probes(model, batch)            # JSON-serialisable dict, training state untouched
    plot_magnitudes({"standard": p0, "block": p1}, "magnitudes.png")
    print(summarize_dynamics({"standard": p0, "block": p1}))

Plotting needs matplotlib (imported lazily, Agg backend).
"""

from .plots import plot_depth_weights, plot_grad_norms, plot_losses, plot_magnitudes
from .probes import collect_probes, depth_weight_matrix
from .report import depth_weight_stats, dynamics_stats, summarize_dynamics

__all__ = [
    "collect_probes",
    "depth_weight_matrix",
    "depth_weight_stats",
    "dynamics_stats",
    "plot_depth_weights",
    "plot_grad_norms",
    "plot_losses",
    "plot_magnitudes",
    "summarize_dynamics",
]
