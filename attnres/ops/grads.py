"""Which inputs of a read need a gradient, and where each gradient goes back, by name.

An autograd function's ``needs_input_grad`` and the tuple its backward returns are positional: one slot
per argument of ``forward`` (after ``ctx``), a var-positional ``*sources`` expanding to one slot per
source; a custom op's are structured by its schema (``Tensor[] sources`` is one nested list). Counting
slots by hand (``needs[3 + i]``) routes a gradient to the wrong input as soon as an argument is added
before the sources. :class:`Slots` reads the argument names from the function's own signature (or the
op's schema) once, and maps by name: the query ``qp``, the output gain ``w`` and the ``sources``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

NAMES = ("qp", "w", "sources")


@dataclass(frozen=True)
class Needs:
    """Whether the folded query, the output gain and each source need a gradient."""

    qp: bool
    w: bool
    sources: tuple[bool, ...]


class Slots:
    """The argument names of a read's ``forward`` (or op schema), for ``needs`` and ``grads`` by name."""

    def __init__(self, names: Sequence[str], star: bool):
        missing = [n for n in NAMES if n not in names]
        if missing:
            raise TypeError(f"a read must take arguments named {NAMES}; {tuple(names)} lacks {missing}")
        if star and names[-1] != "sources":
            raise TypeError(f"*sources must be the last argument, got {tuple(names)}")
        self.names, self.star = tuple(names), star
        self._q, self._w, self._s = (self.names.index(n) for n in NAMES)  # resolved once, by name
        self._width = len(self.names)

    @classmethod
    def of_function(cls, forward: Callable) -> Slots:
        """From ``forward(ctx, ..., *sources)`` of an autograd.Function."""
        params = list(inspect.signature(forward).parameters.values())[1:]  # after ctx
        star = bool(params) and params[-1].kind is inspect.Parameter.VAR_POSITIONAL
        if not star:
            raise TypeError(f"{forward.__qualname__} must end with *sources")
        return cls([p.name for p in params], star=True)

    @classmethod
    def of_op(cls, op) -> Slots:
        """From a custom op's schema, whose ``sources`` is one ``Tensor[]`` argument."""
        return cls([a.name for a in op._schema.arguments], star=False)

    def needs(self, ctx) -> Needs:
        flags = ctx.needs_input_grad
        if not self.star and not self._s < len(flags) <= self._width:  # trailing defaulted arguments may be absent
            raise TypeError(f"needs_input_grad has {len(flags)} entries, the op {self._width} arguments")
        sources = flags[self._s:] if self.star else flags[self._s]
        return Needs(bool(flags[self._q]), bool(flags[self._w]), tuple(bool(f) for f in sources))

    def grads(self, dqp: Tensor | None, dw: Tensor | None, sources: Sequence[Tensor | None],
              inputs: int | None = None) -> tuple:
        """The backward's return: each gradient in its argument's slot, None in the others; for an op, one per
        argument it was called with (``inputs``: trailing defaulted ones may be absent)."""
        out = [None] * (self._width - 1 if self.star else inputs or self._width)
        out[self._q], out[self._w] = dqp, dw
        if self.star:
            return (*out, *sources)
        out[self._s] = list(sources)
        return tuple(out)
