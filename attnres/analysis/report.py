"""Markdown summaries of probes (PAPER §5: Fig. 5 training dynamics, Fig. 8 learned weights)."""

from __future__ import annotations

import math

import numpy as np


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf if a > 0 else math.nan


def _fmt(x: float, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "∞"
    return format(x, spec)


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def depth_weight_stats(depth_weights: list[list[float] | None] | None) -> dict:
    """Where the depth attention goes, averaged over read points that have a choice (>= 2 sources).

    - ``embedding``: mean weight on source 0 (the token embedding);
    - ``predecessor``: mean weight on the last source, the immediate predecessor (Full: the previous
      sublayer's output; Block: the partial sum of the open block, or the last completed block when
      the read opens a block) -- the "diagonal" of PAPER Fig. 8;
    - ``uniform_predecessor``: the same average for uniform weights (1 / number of sources), the value
      at initialisation, for reference;
    - ``*_attn`` / ``*_mlp``: the same over pre-attention (even) / pre-MLP (odd) reads only;
    - ``final_embedding``: the final read's weight on the embedding (None without final aggregation).
    All None when there are no depth weights (standard residual).
    """
    keys = ("embedding", "predecessor", "uniform_predecessor", "embedding_attn", "embedding_mlp",
            "predecessor_attn", "predecessor_mlp", "final_embedding")
    if depth_weights is None:
        return dict.fromkeys(keys)
    n = len(depth_weights) - 1  # read n is the final output
    chosen = [(j, w) for j, w in enumerate(depth_weights) if w is not None and len(w) >= 2]

    def mean(vals):
        return float(np.mean(vals)) if vals else None

    def pick(pred):
        sel = [w for j, w in chosen if pred(j)]
        return mean([w[0] for w in sel]), mean([w[-1] for w in sel])

    emb, pred = pick(lambda j: True)
    emb_a, pred_a = pick(lambda j: j < n and j % 2 == 0)
    emb_m, pred_m = pick(lambda j: j < n and j % 2 == 1)
    final = depth_weights[n] if n >= 0 else None
    return {
        "embedding": emb,
        "predecessor": pred,
        "uniform_predecessor": mean([1.0 / len(w) for _, w in chosen]),
        "embedding_attn": emb_a,
        "embedding_mlp": emb_m,
        "predecessor_attn": pred_a,
        "predecessor_mlp": pred_m,
        "final_embedding": None if not final else float(final[0]),
    }


def dynamics_stats(probe: dict) -> dict:
    """Scalar summaries of one :func:`collect_probes` result.

    - ``output_growth``: output RMS of the last sublayer / of the first (PreNorm dilution, Fig. 5b);
    - ``output_max_over_min``: spread of sublayer output RMS;
    - ``hidden_growth``: hidden RMS at the final read / at the first read;
    - ``grad_max_over_min``: spread of per-sublayer gradient norms (Fig. 5c);
    - ``grad_first_over_last``: mean gradient norm of the first decoder layer's two sublayers / the
      last layer's (> 1: early layers get the larger gradients);
    plus :func:`depth_weight_stats`.
    """
    out = np.asarray(probe["output_rms"], dtype=np.float64)
    hid = np.asarray(probe["hidden_rms"], dtype=np.float64)
    grad = np.asarray(probe["grad_norm"], dtype=np.float64)
    first, last = grad[:2].mean(), grad[-2:].mean()
    positive = grad[grad > 0]
    return {
        "loss": probe.get("loss"),
        "output_growth": _ratio(out[-1], out[0]),
        "output_max_over_min": _ratio(out.max(), out.min()),
        "hidden_growth": _ratio(hid[-1], hid[0]),
        "grad_max_over_min": _ratio(positive.max(), positive.min()) if positive.size else math.nan,
        "grad_first_over_last": _ratio(first, last),
        **depth_weight_stats(probe.get("depth_weights")),
    }


def summarize_dynamics(probes: dict[str, dict]) -> str:
    """A markdown table and a few sentences comparing schemes' probes (label -> collect_probes result).

    The "probe-batch loss" column is the loss :func:`collect_probes` measured on the batch it probed
    (in training, a few validation windows), not the validation loss over eval batches."""
    if not probes:
        return "_No probes._\n"
    stats = {label: dynamics_stats(p) for label, p in probes.items()}
    lines = [
        "| scheme | probe-batch loss | output RMS last/first | output RMS max/min | hidden RMS final/first "
        "| grad max/min | grad first/last layer | weight on embedding | weight on predecessor (uniform) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in stats.items():
        pred = "–"
        if s["predecessor"] is not None:
            pred = f"{_pct(s['predecessor'])} ({_pct(s['uniform_predecessor'])})"
        loss = "–" if s["loss"] is None else _fmt(s["loss"], ".3f")
        ratios = [_fmt(s[k]) for k in ("output_growth", "output_max_over_min", "hidden_growth",
                                       "grad_max_over_min", "grad_first_over_last")]
        cells = [label, loss, *ratios, _pct(s["embedding"]), pred]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Probe-batch loss: the language-modelling loss on the probed batch itself (training probes "
                 "use the first validation windows), not the validation loss over eval batches.")
    lines.append("")

    labels = list(stats)
    growth = ", ".join(f"{_fmt(stats[k]['output_growth'], '.1f')}× under `{k}`" for k in labels)
    lines.append(f"- Sublayer output RMS, last vs first sublayer: {growth} "
                 "(PAPER Fig. 5b: grows with depth under PreNorm, bounded under Block AttnRes).")
    spread = ", ".join(
        f"{_fmt(s['grad_max_over_min'], '.1f')}× (first/last layer {_fmt(s['grad_first_over_last'])})"
        f" under `{k}`"
        for k, s in stats.items()
    )
    lines.append(f"- Gradient-norm spread across sublayers, max/min: {spread} "
                 "(PAPER Fig. 5c: AttnRes makes gradients more uniform across depth).")
    for k, s in stats.items():
        if s["predecessor"] is None:
            continue
        emb, pred, uni = _pct(s["embedding"]), _pct(s["predecessor"]), _pct(s["uniform_predecessor"])
        pa, pm = _pct(s["predecessor_attn"]), _pct(s["predecessor_mlp"])
        ea, em = _pct(s["embedding_attn"]), _pct(s["embedding_mlp"])
        final = "" if s["final_embedding"] is None else \
            f"; the final output puts {_pct(s['final_embedding'])} on the embedding"
        lines.append(
            f"- `{k}` depth attention: {emb} on the embedding, {pred} on the immediate predecessor (uniform "
            f"weights would give {uni}); predecessor weight pre-attention {pa} vs pre-MLP {pm}, embedding "
            f"weight pre-attention {ea} vs pre-MLP {em}{final}."
        )
    return "\n".join(lines) + "\n"
