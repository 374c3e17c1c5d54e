"""RoPE frequencies: the default rotary embedding and the ``linear`` and ``llama3`` scalings.

The parameters follow transformers 5's ``rope_parameters`` convention (one flat dict):
``{"rope_type": "default" | "linear" | "llama3", "rope_theta": base, ...}`` with ``factor`` (linear,
llama3) and ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings`` (llama3). The
inverse frequencies are transformers' (``modeling_rope_utils._compute_{linear_scaling,llama3}_parameters``),
op for op in fp32; both have attention factor 1, so cos / sin are not rescaled. Any other type (yarn,
dynamic, longrope, ...) and any key a type does not use are a one-line ``ValueError``: a RoPE variant is
implemented or refused, never ignored.
"""

from __future__ import annotations

import math
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "llama3")
_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _number(rope_type: str, key: str, value: Any, integer: bool = False) -> float | int:
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0
    if not ok:
        what = "a positive int" if integer else "a positive number"
        raise ValueError(f"rope_parameters: {key} of rope_type {rope_type!r} must be {what}, got {value!r}")
    return int(value) if integer else float(value)


def standardize(rope_parameters: dict | None, rope_theta: float) -> dict:
    """The checked, complete ``rope_parameters`` (``rope_type`` and ``rope_theta`` always present).

    ``rope_theta``: the config's own key; the dict's ``rope_theta`` wins when it has one (transformers'
    priority), and the caller keeps the two equal. The legacy spelling ``type`` is read as ``rope_type``;
    ``partial_rotary_factor`` may only be 1."""
    if rope_parameters is None:
        rope_parameters = {}
    if not isinstance(rope_parameters, dict):
        raise ValueError(f"rope_parameters must be a dict (one RoPE for every layer), got {rope_parameters!r}")
    p = dict(rope_parameters)
    legacy = p.pop("type", None)
    rope_type = p.pop("rope_type", None) or legacy or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if p.pop("partial_rotary_factor", 1.0) not in (1, 1.0):
        raise ValueError("rope_parameters: partial_rotary_factor must be 1 (RoPE on the whole head)")
    out: dict[str, Any] = {"rope_type": rope_type,
                           "rope_theta": _number(rope_type, "rope_theta", p.pop("rope_theta", rope_theta))}
    for key in _KEYS[rope_type]:
        if key not in p:
            raise ValueError(f"rope_parameters: rope_type {rope_type!r} needs {key} "
                             f"(keys: {', '.join(_KEYS[rope_type])})")
        out[key] = _number(rope_type, key, p.pop(key), integer=key == "original_max_position_embeddings")
    if p:
        raise ValueError(f"rope_parameters: key {sorted(p)[0]!r} is not used by rope_type {rope_type!r} "
                         f"(its keys: rope_theta{''.join(', ' + k for k in _KEYS[rope_type])})")
    if rope_type == "llama3" and not out["low_freq_factor"] < out["high_freq_factor"]:
        raise ValueError(f"rope_parameters: llama3 needs low_freq_factor < high_freq_factor, got "
                         f"{out['low_freq_factor']} and {out['high_freq_factor']}")
    return out


def inv_freq(params: dict, head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The ``[head_dim / 2]`` fp32 inverse frequencies of standardized ``params``."""
    base = params["rope_theta"]
    freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
                           / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "linear":
        return freq / params["factor"]
    if rope_type == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > low_wavelen, freq / factor, freq)  # long wavelengths: divided by factor
        smooth = (old_len / wavelen - low) / (high - low)  # between the two: interpolated
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return freq
