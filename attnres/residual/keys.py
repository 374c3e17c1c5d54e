"""A scheme's config keys (name, default, unit, allowed values) and what a scheme may know about the model.

Each scheme class lists its keys in ``keys``; :mod:`.registry` collects them, and :class:`AttnResConfig`
validates the keys of the chosen scheme through them (one-line ``ValueError`` naming the key, the value
and what is allowed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Key:
    """One config key of a scheme. ``kind``: "int", "float", "bool" or "choice"; ``optional``: None is
    allowed (and means what ``doc`` says); ``minimum``/``maximum`` bound numbers (inclusive)."""

    name: str
    default: Any
    doc: str
    kind: str = "int"
    unit: str = "—"
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False

    def allowed(self) -> str:
        """What the key accepts, in words."""
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            noun = "an int" if self.kind == "int" else "a number"
            bounds = []
            if self.minimum is not None:
                bounds.append(f">= {self.minimum:g}")
            if self.maximum is not None:
                bounds.append(f"<= {self.maximum:g}")
            text = noun + (" " + " and ".join(bounds) if bounds else "")
        return text + (" (or None)" if self.optional else "")

    def validate(self, value):
        """``value`` if this key accepts it (ints are accepted for floats), else a one-line ValueError."""
        if value is None and self.optional:
            return None
        ok = False
        if self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind == "choice":
            ok = isinstance(value, str) and value in self.choices
        elif self.kind in ("int", "float"):
            kinds = (int,) if self.kind == "int" else (int, float)
            ok = isinstance(value, kinds) and not isinstance(value, bool) and value == value  # not nan
            ok = ok and (self.minimum is None or value >= self.minimum)
            ok = ok and (self.maximum is None or value <= self.maximum)
        if not ok:
            raise ValueError(f"{self.name} must be {self.allowed()}, got {value!r}")
        return float(value) if self.kind == "float" else value


@dataclass(frozen=True)
class ModelDims:
    """What a scheme may know about the model it is built for. ``block_size`` is the resolved S (sublayers)
    for Full/Block and None otherwise; ``final_aggregation`` is ``attn_res_final_aggregation``."""

    num_sublayers: int
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    eps: float = 1e-6
    block_size: int | None = None
    final_aggregation: bool = True
