"""Checkpoints saved before the AttnRes parameters moved into the layers that read.

Old layout: ``{prefix}residual.pseudo_query`` and ``{prefix}residual.key_norm_weight``, each
``[rows, D]`` with row 2i before layer i's attention, 2i+1 before its MLP and, when the row count is
odd, the last row for the final aggregation. New layout: ``{prefix}layers.{i}.attn_res.*``,
``{prefix}layers.{i}.mlp_res.*`` and ``{prefix}output_res.*``. The conversion is exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

LEGACY_NAMES = ("pseudo_query", "key_norm_weight")


def read_point_prefix(j: int, num_layers: int) -> str:
    """Module path (under the decoder) of read point j's DepthQuery."""
    if j == 2 * num_layers:
        return "output_res"
    return f"layers.{j // 2}.{'attn_res' if j % 2 == 0 else 'mlp_res'}"


def convert_legacy_state_dict(state_dict: dict[str, Tensor], prefix: str = "") -> bool:
    """Rename old stacked AttnRes entries under ``prefix`` in place; True if any were found."""
    found = False
    for name in LEGACY_NAMES:
        stacked = state_dict.pop(f"{prefix}residual.{name}", None)
        if stacked is None:
            continue
        found = True
        num_layers = stacked.shape[0] // 2  # an odd row count carries the final aggregation
        for j, row in enumerate(stacked):
            state_dict[f"{prefix}{read_point_prefix(j, num_layers)}.{name}"] = row.clone()
    return found


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    return [single] if single.exists() else []


def legacy_pretrained_state_dict(name_or_path: str | os.PathLike, base_prefix: str,
                                 subfolder: str | None = None) -> dict | None:
    """The converted state dict of a local checkpoint directory in the old layout, else None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(name_or_path) / (subfolder or "")
    if not path.is_dir():
        return None
    files = _weight_files(path)
    old = {f"residual.{n}" for n in LEGACY_NAMES}
    legacy = False
    for f in files:
        with safe_open(str(f), "pt") as fh:
            legacy = legacy or any(k.split(".", 1)[-1] in old or k in old for k in fh.keys())
    if not legacy:
        return None
    state_dict: dict[str, Tensor] = {}
    for f in files:
        state_dict.update(load_file(str(f)))
    for prefix in ("", f"{base_prefix}."):
        convert_legacy_state_dict(state_dict, prefix)
    return state_dict
