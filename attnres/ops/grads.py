"""Which inputs of a read need a gradient, and where each gradient goes back, by name.

An autograd function's ``needs_input_grad`` and the tuple its backward returns are positional: one slot
per argument of ``forward`` (after ``ctx``), a var-positional ``*sources`` expanding to one slot per
source; a custom op's are structured by its schema (``Tensor[] sources`` is one nested list). Counting
slots by hand (``needs[3 + i]``) routes a gradient to the wrong input as soon as an argument is added
before the sources. :class:`Slots` reads the argument names from the function's own signature (or the
op's schema) once, and maps by name: the query ``qp``, the output gain ``w`` and the ``sources``.

Carried reads. A source read by many reads (Full's outputs, Block's completed blocks) gets one gradient term per
read, which autograd (or inductor, lazily) sums. A *carried* read also takes ``carry``, one carrier for each of
its first m sources, and returns a carrier for every source: a zero-stride zero tensor shaped like it, whose
only consumer is the next read over the same leading sources. In backward a read adds the gradient its carriers
received (the sum of the later reads' terms) into its own term for each source, in one pass of the kernel, and
returns the total of a carried source through that source's carrier, of the others through the source itself;
the first read of a source returns its whole gradient, accumulated in one buffer per source. The caller
promises that ``carry[i]`` is the carrier of the same tensor as ``sources[i]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

NAMES = ("qp", "w", "sources")


@dataclass(frozen=True)
class Needs:
    """Whether the folded query, the output gain and each source need a gradient."""

    qp: bool
    w: bool
    sources: tuple[bool, ...]
    carry: tuple[bool, ...] = ()  # the carriers of the first len(carry) sources (a carried read)

    def wanted(self) -> tuple[bool, ...]:
        """Whether each source's gradient (total, for a carried one) is needed, through its carrier if carried."""
        m = len(self.carry)
        return (*self.carry, *self.sources[m:])

    def route(self, totals: Sequence[Tensor | None]) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """(source gradients, carrier gradients): a carried source's total goes back through its carrier."""
        m = len(self.carry)
        return [None] * m + list(totals[m:]), list(totals[:m])


def carriers(sources: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """One carrier per source: zeros of its shape and dtype, stride 0 (one element of memory)."""
    return tuple(torch.zeros((), dtype=v.dtype, device=v.device).expand(v.shape) for v in sources)


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
        self._c = self.names.index("carry") if "carry" in self.names else None  # an op's carriers
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

    def needs(self, ctx, carried: int = 0) -> Needs:
        """The flags of ``ctx.needs_input_grad``; a function's ``*sources`` ends with ``carried`` carriers."""
        flags = ctx.needs_input_grad
        if not self.star and not self._s < len(flags) <= self._width:  # trailing defaulted arguments may be absent
            raise TypeError(f"needs_input_grad has {len(flags)} entries, the op {self._width} arguments")
        if self.star:
            sources, carry = flags[self._s:len(flags) - carried], flags[len(flags) - carried:]
        else:
            sources = flags[self._s]
            carry = flags[self._c] if self._c is not None and self._c < len(flags) else ()
            carry = carry if isinstance(carry, (list, tuple)) else ()  # an absent (None) carry: one False
        return Needs(bool(flags[self._q]), bool(flags[self._w]), tuple(bool(f) for f in sources),
                     tuple(bool(f) for f in carry))

    def grads(self, dqp: Tensor | None, dw: Tensor | None, sources: Sequence[Tensor | None],
              inputs: int | None = None, carry: Sequence[Tensor | None] | None = None) -> tuple:
        """The backward's return: each gradient in its argument's slot, None in the others; for an op, one per
        argument it was called with (``inputs``: trailing defaulted ones may be absent); ``carry``: the
        carriers' gradients (a function's come after the sources')."""
        out = [None] * (self._width - 1 if self.star else inputs or self._width)
        out[self._q], out[self._w] = dqp, dw
        if self.star:
            return (*out, *sources, *(carry or ()))
        out[self._s] = list(sources)
        if carry is not None:
            out[self._c] = list(carry)
        return tuple(out)
