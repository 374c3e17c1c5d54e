"""One rank's store of completed sources (the cross-stage cache), with its bookkeeping checked.

A source a later stage of this rank reads is kept here as a detached leaf, per microbatch, and handed to
that stage as a keyword input (DISTRIBUTED.md §3.3, "variant C"): both of torch's backward paths (the full
one and the zero-bubble input/weight split) then compute its gradient, which stays on the leaf (a
*deposit*). The stage that put the leaf in collects the deposits: through a tensor hook when it computed
the source, or added to the wire gradient it sends back when it received it. Checked: a stage finds what
the layout says its rank holds, every expected deposit arrives before it is collected, and nothing is
left once a step is done.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import Layout


class PipelineStoreError(RuntimeError):
    """The store disagrees with the routing table (a bug in the pipeline, never bad input)."""


class RankStore:
    def __init__(self, layout: Layout, rank: int):
        self.layout = layout
        self.rank = rank
        self.leaves: dict[int, dict[int, Tensor]] = {}  # microbatch -> source -> leaf
        self.wire: dict[tuple[int, int], list[tuple[int, int, Tensor]]] = {}  # (stage, mb) -> (source, pos, leaf)
        self.deposits: dict[tuple[int, int], list[int]] = {}  # (mb, source) -> [arrived, expected]
        self.current: dict[int, int] = {}  # stage -> the microbatch its forward is running

    def take(self, k: int, mb: int) -> tuple[Tensor, ...]:
        """The leaves stage k reads from the store for microbatch ``mb`` (``layout.cached_in(k)``)."""
        held = self.leaves.get(mb, {})
        if set(held) != self.layout.held_before(k):
            raise PipelineStoreError(f"rank {self.rank}, stage {k}, microbatch {mb}: the store holds sources "
                                     f"{sorted(held)}, the layout expects {sorted(self.layout.held_before(k))}")
        return tuple(held[j] for j in self.layout.cached_in(k))

    def put(self, k: int, mb: int, j: int, t: Tensor, pos: int | None = None) -> None:
        """Keep source j of microbatch ``mb``, which stage k computed (``pos`` None) or received at wire
        position ``pos``. With autograd on, its deposits are collected for ``t``'s producer."""
        track = torch.is_grad_enabled() and t.requires_grad
        leaf = t.detach().requires_grad_(track)
        self.leaves.setdefault(mb, {})[j] = leaf
        if not track:
            return
        self.deposits[(mb, j)] = [0, len(self.layout.consumers(k, j))]
        if pos is not None:
            self.wire.setdefault((k, mb), []).append((j, pos, leaf))
        else:
            t.register_hook(lambda g: self._add(g, mb, j, leaf))

    def release(self, k: int, mb: int) -> None:
        """After stage k's forward: the rank's last stage drops the microbatch (its readers hold the leaves)."""
        if self.layout.last_on_rank(k):
            self.leaves.pop(mb, None)

    def deposit(self, k: int, mb: int, grads: tuple[Tensor | None, ...]) -> None:
        """Stage k's backward left ``grads`` on its store leaves (``layout.cached_in(k)`` order)."""
        for j, g in zip(self.layout.cached_in(k), grads, strict=True):
            if g is None:
                continue
            if (mb, j) not in self.deposits:
                raise PipelineStoreError(f"rank {self.rank}, stage {k}: a gradient for source {j} of "
                                         f"microbatch {mb} arrived after it was collected")
            self.deposits[(mb, j)][0] += 1

    def settle_wire(self, k: int, mb: int, grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
        """Stage k's input gradients plus the deposits on the sources it received and stored."""
        grads = list(grads)
        for j, pos, leaf in self.wire.pop((k, mb), []):
            g = self._collect(mb, j, leaf)
            if g is not None:
                grads[pos] = g if grads[pos] is None else grads[pos] + g
        return tuple(grads)

    def _add(self, g: Tensor, mb: int, j: int, leaf: Tensor) -> Tensor:
        c = self._collect(mb, j, leaf)
        return g if c is None else g + c

    def _collect(self, mb: int, j: int, leaf: Tensor) -> Tensor | None:
        arrived, expected = self.deposits.pop((mb, j))
        if arrived != expected:
            raise PipelineStoreError(f"rank {self.rank}: source {j} of microbatch {mb} is collected with "
                                     f"{arrived} of its {expected} gradient deposits")
        g, leaf.grad = leaf.grad, None
        return g

    def check_empty(self) -> None:
        """After a step: no leaf, no pending deposit, no received source left."""
        left = {"leaves": {mb: sorted(s) for mb, s in self.leaves.items()}, "deposits": sorted(self.deposits),
                "received": sorted(self.wire)}
        if any(left.values()):
            raise PipelineStoreError(f"rank {self.rank}: the store is not empty after the step: {left}")

    def clear(self) -> None:
        self.leaves.clear()
        self.wire.clear()
        self.deposits.clear()
        self.current.clear()
