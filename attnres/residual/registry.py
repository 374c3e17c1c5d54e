"""The one list of residual schemes: name -> scheme, its config keys (defaults, units, allowed values) and
how it is built from a model's dimensions. ``attnres.residual.RESIDUALS``, ``AttnResConfig``'s validation,
``attnres.train.config.RESIDUALS`` and the CLI's choices all come from here, in this order.

``full`` and ``block`` share the Table 4 ablation keys (``ablation.py``); at their defaults they build the
fast :class:`~.block.BlockAttnRes`. They also read the decoder-wide keys ``attn_res_block_size`` /
``attn_res_num_blocks`` / ``attn_res_block_layers`` (resolved by ``AttnResConfig.block_size``),
``attn_res_final_aggregation`` and ``attn_res_two_phase``, which every config carries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import ablation
from .base import ResidualScheme
from .delta import DeltaAttnRes
from .denseformer import DenseFormer
from .depth_mha import DepthMHA
from .hc import HyperConnections
from .keys import Key, ModelDims
from .mhc import ManifoldHyperConnections
from .mhc_lite import MHCLite
from .realformer import RealFormer
from .residual_scale import ResidualScale
from .standard import StandardResidual


@dataclass(frozen=True)
class Entry:
    """A registered scheme: ``build(dims, options)`` gets every key of ``keys`` in ``options``."""

    name: str
    doc: str
    keys: tuple[Key, ...]
    build: Callable[[ModelDims, dict], ResidualScheme]
    reads: tuple[str, ...] = ()  # decoder-wide AttnResConfig keys it uses (documentation)


ATTN_RES_KEYS = ("attn_res_final_aggregation", "attn_res_two_phase")
BLOCK_KEYS = ("attn_res_block_size", "attn_res_num_blocks", "attn_res_block_layers")

SCHEMES: tuple[Entry, ...] = (
    Entry("standard", "the PreNorm residual sum (Llama)", (),
          lambda dims, opts: StandardResidual(dims.num_sublayers, dims.eps)),
    Entry("block", "Block AttnRes (PAPER Eq. 5-6) and its Table 4 ablations", ablation.KEYS,
          lambda dims, opts: ablation.build("block", dims, opts), BLOCK_KEYS + ATTN_RES_KEYS),
    Entry("full", "Full AttnRes (PAPER Eq. 1-4) and its Table 4 ablations", ablation.KEYS,
          lambda dims, opts: ablation.build("full", dims, opts), ATTN_RES_KEYS),
    Entry("denseformer", "DenseFormer depth-weighted averages, identity init (ZOO §1)", DenseFormer.keys,
          DenseFormer.build),
    Entry("hc", "Hyper-Connections, n streams (ZOO §2.1)", HyperConnections.keys, HyperConnections.build),
    Entry("mhc", "mHC: Sinkhorn doubly-stochastic stream mixing (ZOO §2.2)", ManifoldHyperConnections.keys,
          ManifoldHyperConnections.build),
    Entry("mhc_lite", "mHC-lite: convex combination of permutations (ZOO §2.3)", MHCLite.keys, MHCLite.build),
    Entry("delta", "Delta AttnRes: residual sum plus a softmax mixture over depth (arXiv 2605.18855)",
          DeltaAttnRes.keys, DeltaAttnRes.build),
    Entry("residual_scale", "misreading: LayerScale / ReZero (ZOO §4a)", ResidualScale.keys, ResidualScale.build),
    Entry("realformer", "misreading: residual on token-attention scores (ZOO §4b)", RealFormer.keys,
          RealFormer.build),
    Entry("depth_mha", "misreading: QKV multi-head attention over depth (ZOO §4c)", DepthMHA.keys, DepthMHA.build),
)
REGISTRY: dict[str, Entry] = {e.name: e for e in SCHEMES}
RESIDUALS: tuple[str, ...] = tuple(REGISTRY)


def all_keys() -> dict[str, list[str]]:
    """Every scheme key -> the schemes that own it (a key may be shared, e.g. ``hyper_streams``)."""
    owners: dict[str, list[str]] = {}
    for e in SCHEMES:
        for k in e.keys:
            owners.setdefault(k.name, []).append(e.name)
    return owners


def entry(residual: str) -> Entry:
    if residual not in REGISTRY:
        raise ValueError(f"residual must be one of {', '.join(RESIDUALS)}; got {residual!r}")
    return REGISTRY[residual]


def options_for(residual: str, given: dict) -> dict:
    """The validated keys of ``residual``: ``given`` (keys of any scheme) over the defaults. A key of another
    scheme is an error unless it is at that key's default (a saved config of one scheme may carry another's
    defaults)."""
    e = entry(residual)
    own = {k.name: k for k in e.keys}
    owners = all_keys()
    for name, value in given.items():
        if name in own:
            continue
        if name not in owners:
            raise ValueError(f"unknown residual key {name!r}; {residual!r} takes: {', '.join(own) or 'none'}")
        defaults = {k.default for s in owners[name] for k in REGISTRY[s].keys if k.name == name}
        if value not in defaults:
            raise ValueError(f"{name}={value!r} is a key of residual={'/'.join(owners[name])}, not of "
                             f"{residual!r} (it takes: {', '.join(own) or 'no keys'})")
    return {name: key.validate(given.get(name, key.default)) for name, key in own.items()}


def build(residual: str, dims: ModelDims, options: dict | None = None) -> ResidualScheme:
    """The scheme ``residual`` for a model of ``dims`` with ``options`` (validated; defaults filled)."""
    return entry(residual).build(dims, options_for(residual, options or {}))
