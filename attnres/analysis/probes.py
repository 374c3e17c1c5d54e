"""Training-dynamics probes (PAPER §5, Fig. 5 and Fig. 8) from one forward + backward pass.

``collect_probes(model, input_ids)`` measures, per sublayer (attention of layer i = sublayer 2i,
MLP = 2i + 1) and per read point (2i, 2i + 1, and ``num_sublayers`` for the final output):

- ``output_rms``: RMS of each sublayer's output f_l (Fig. 5b, "output magnitude");
- ``hidden_rms``: RMS of the hidden state h_l the sublayer reads, before its PreNorm;
- ``grad_norm``: L2 norm of the gradient of the sublayer's weights (Fig. 5c);
- ``depth_weights``: AttnRes depth-attention weights averaged over batch and tokens (Fig. 8).

The gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is created, accumulated or
changed, no gradient-accumulation hooks fire (DDP buckets, optimizer-in-backward), and the optimizer
is not involved.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The eager model behind torch.compile (``_orig_mod``) and DDP-style (``module``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif not hasattr(model, "model") and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _sublayers(model: nn.Module) -> list[nn.Module]:
    """[layer0.self_attn, layer0.mlp, layer1.self_attn, ...]: sublayer l at index l."""
    out = []
    for layer in model.model.layers:
        out += [layer.self_attn, layer.mlp]
    return out


def collect_probes(model: nn.Module, input_ids: torch.LongTensor) -> dict:
    """Probe one batch: one forward + backward with ``labels=input_ids``; the training state is untouched.

    Works in train or eval mode (the mode is left as it is), inside ``torch.no_grad()`` or
    ``torch.inference_mode()`` (gradients are re-enabled locally), and on a ``torch.compile``-d model
    (the eager module behind it is probed, so the hooks fire).

    Returns a JSON-serialisable dict:

    - ``"output_rms"``: list[float], one per sublayer (2 * num_hidden_layers);
    - ``"hidden_rms"``: list[float], one per read point (2 * num_hidden_layers + 1, the last is the
      final output);
    - ``"grad_norm"``: list[float], one per sublayer; 0.0 for a sublayer with no trainable weights;
    - ``"depth_weights"``: None for the standard residual, else one list per read point of the mean
      weight on each source (read j's own number of sources; a final output without aggregation
      has None);
    - ``"loss"``: float, the language-modelling loss of the batch;
    - ``"residual"``: the scheme's name; ``"block_size"``: sublayers per block (1 for full, None
      for standard).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got {type(input_ids).__name__} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids needs at least 2 tokens per row for a next-token loss, got {input_ids.shape[1]}"
        )
    model = _unwrap(model)
    sublayers = _sublayers(model)
    num_sublayers = len(sublayers)
    device = model.get_input_embeddings().weight.device

    out_sq: list[torch.Tensor | None] = [None] * num_sublayers

    def hook(idx):
        def fn(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            out_sq[idx] = y.detach().float().pow(2).mean()
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(sublayers)]
    params = [[p for p in m.parameters() if p.requires_grad] for m in sublayers]
    flat = [p for ps in params for p in ps]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            ids = input_ids.to(device).clone()  # a normal tensor even if made under inference_mode
            with model.model.record() as reads:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, flat, allow_unused=True) if flat else ()
    finally:
        for h in handles:
            h.remove()

    if any(sq is None for sq in out_sq):
        missing = [i for i, sq in enumerate(out_sq) if sq is None]
        raise RuntimeError(f"sublayers {missing} produced no output during the probe forward")
    output_rms = torch.stack(out_sq).sqrt().tolist()

    grad_norm = []
    k = 0
    for ps in params:
        gs = [g for g in grads[k:k + len(ps)] if g is not None]
        k += len(ps)
        sq = sum(g.detach().float().pow(2).sum() for g in gs) if gs else None
        grad_norm.append(sq)
    grad_norm = [0.0 if sq is None else math.sqrt(float(sq)) for sq in grad_norm]

    by_read = {r.read: r for r in reads}
    if sorted(by_read) != list(range(num_sublayers + 1)):
        raise RuntimeError(
            f"expected reads 0..{num_sublayers} from the residual scheme, got {sorted(by_read)}"
        )
    ordered = [by_read[j] for j in range(num_sublayers + 1)]
    hidden_rms = [float(r.hidden_rms) for r in ordered]
    if all(r.weights is None for r in ordered):
        depth_weights = None
    else:
        depth_weights = [
            None if r.weights is None else r.weights.detach().float().flatten(1).mean(1).tolist()
            for r in ordered
        ]

    return {
        "residual": model.model.residual.name,
        "block_size": getattr(model.model.residual, "block_size", None),
        "loss": float(loss.detach()),
        "output_rms": output_rms,
        "hidden_rms": hidden_rms,
        "grad_norm": grad_norm,
        "depth_weights": depth_weights,
    }


def depth_weight_matrix(depth_weights: list[list[float] | None]) -> np.ndarray:
    """Ragged per-read weights -> ``[reads, max_sources]`` float array, missing entries NaN.

    Row j holds read j's weights in its first ``len(depth_weights[j])`` columns; a None row is all NaN.
    """
    if depth_weights is None:
        raise ValueError("depth_weights is None (a standard residual has no depth weights)")
    rows = [[] if w is None else list(w) for w in depth_weights]
    width = max((len(w) for w in rows), default=0)
    out = np.full((len(rows), width), np.nan, dtype=np.float64)
    for j, w in enumerate(rows):
        out[j, :len(w)] = w
    return out
