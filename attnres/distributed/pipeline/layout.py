"""The pipeline's routing table: what every hop between stages carries (pure Python, no torch).

Terms (DESIGN.md, "The seam"). The decoder layers are cut into C = P * V stages, stage k running
layers ``[lo_k, hi_k)``; ``ranks[k]`` is the rank that runs it. A stage boundary after layer i sits after
sublayer boundary j = 2(i + 1). For Block/Full AttnRes (Full = Block with S = 1) the residual state at j is
the source list ``(b_0, b_1, ..., b_{n-1})`` with n = 1 + ceil(j / S); its last entry is a partial sum iff
``j % S != 0``. Standard's state is ``(h,)``.

A hop (stage k -> k + 1) carries the state's last entry (the *hidden*) first, then ``delta[k]``: the other
sources the receiving rank does not hold. With ``cache=False`` that is every other source (the naive
transport). With the cache, a rank keeps (in a rank-local store, one per microbatch) every completed source
its stages saw and a later stage of the same rank will read: received on the wire, or completed by one of
its own stages. ``keep_exit`` decides the one case where readings differ: a stage whose last sublayer
closes a block also keeps that block (it leaves as the hop's hidden, and this rank will read it again). The
paper's Eq. 8 and Megatron's ``(P-1)M/k + 1`` do not keep it, so a rank is later sent back the block it
made; ``keep_exit=False`` reproduces their counts.

Every count here is in tensors of one hop's ``[rows, T, d]``; :meth:`Layout.hop_bytes` turns them into bytes.
Backward sends one gradient per forward tensor, so its counts are the same.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

V_SHAPE = ("ZBVZeroBubble", "DualPipeV")  # schedules that place stages in a V (torch's style="v")


def even_split(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """``num_layers`` decoder layers as ``num_stages`` equal stages (ValueError if they do not divide)."""
    if num_stages < 1 or num_layers % num_stages:
        raise ValueError(f"{num_layers} decoder layers do not split into {num_stages} equal stages")
    return (num_layers // num_stages,) * num_stages


def placement(ranks: int, num_stages: int, style: str = "loop") -> tuple[int, ...]:
    """Stage -> rank as torch's schedules place them: ``loop`` (stage k on rank k % P) or ``v`` (a zig-zag:
    0, 1, ..., P-1, P-1, ..., 0, 0, 1, ...), torch's ``generate_stage_to_rank_mapping``."""
    if style == "loop":
        return tuple(k % ranks for k in range(num_stages))
    if style != "v":
        raise ValueError(f"placement style must be 'loop' or 'v', got {style!r}")
    if num_stages % ranks:
        raise ValueError(f"a V placement needs the stages ({num_stages}) to be a multiple of the ranks ({ranks})")
    return tuple(k % ranks if (k // ranks) % 2 == 0 else ranks - 1 - k % ranks for k in range(num_stages))


def style_of(schedule: str) -> str:
    return "v" if schedule in V_SHAPE else "loop"


def paper_naive(P: int, V: int, Np: float) -> float:
    """PAPER Eq. 7: blocks sent per token over all hops without the cache, C(C-1)/2 * N_p."""
    C = P * V
    return C * (C - 1) / 2 * Np


def paper_cached(P: int, V: int, Np: float) -> float:
    """PAPER Eq. 8: with the cache, P(P-1)/2 * N_p + (V-1) * P^2 * N_p."""
    return P * (P - 1) / 2 * Np + (V - 1) * P * P * Np


@dataclass(frozen=True)
class Hop:
    """One boundary: stage ``k`` sends ``sources`` (hidden first) to stage ``k + 1``; ``local`` when both
    stages run on one rank (a V's turn: no communication)."""

    k: int
    sources: tuple[int, ...]
    local: bool

    @property
    def tensors(self) -> int:
        return len(self.sources)


@dataclass(frozen=True)
class Layout:
    """The routing table of one pipeline (see the module docstring).

    ``layers``: decoder layers per stage; ``ranks``: the rank of each stage; ``block_size``: S in sublayers,
    None for the standard residual."""

    layers: tuple[int, ...]
    ranks: tuple[int, ...]
    block_size: int | None
    cache: bool = True
    keep_exit: bool = True

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "ranks", tuple(self.ranks))
        if not self.layers or len(self.layers) != len(self.ranks):
            raise ValueError(f"layers per stage {self.layers} and ranks per stage {self.ranks} must match")
        if any(n < 1 for n in self.layers):
            raise ValueError(f"every stage needs at least one decoder layer, got {self.layers}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 or None, got {self.block_size}")

    @classmethod
    def build(cls, num_layers: int, P: int, V: int, block_size: int | None, *, style: str = "loop",
              split: tuple[int, ...] | None = None, cache: bool = True, keep_exit: bool = True) -> Layout:
        """The layout of ``num_layers`` layers over P ranks x V stages each, split evenly unless ``split``."""
        layers = even_split(num_layers, P * V) if split is None else tuple(split)
        if sum(layers) != num_layers:
            raise ValueError(f"the split {layers} covers {sum(layers)} layers, the model has {num_layers}")
        return cls(layers, placement(P, len(layers), style), block_size, cache, keep_exit)

    # ------------------------------------------------------------------ shape of the state

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    @property
    def num_ranks(self) -> int:
        return max(self.ranks) + 1

    @cached_property
    def _starts(self) -> tuple[int, ...]:
        return tuple(itertools.accumulate(self.layers, initial=0))

    def bounds(self, k: int) -> tuple[int, int]:
        """Sublayer boundaries (j_in, j_out) of stage k."""
        return 2 * self._starts[k], 2 * self._starts[k + 1]

    def n_sources(self, j: int) -> int:
        """Entries of the state after j sublayers."""
        return 1 if self.block_size is None else 1 + -(-j // self.block_size)

    def complete(self, j: int) -> frozenset[int]:
        """Entries of the state after j sublayers that no later sublayer changes."""
        if self.block_size is None:
            return frozenset()
        n = self.n_sources(j)
        return frozenset(range(n if j % self.block_size == 0 else n - 1))

    # ------------------------------------------------------------------ the walk

    @cached_property
    def tables(self) -> dict:
        """One walk over the stages in order: ``held_before[k]`` (sources stage k's rank holds when k runs),
        ``new_held[k]`` (sources stage k adds to its rank's store), ``delta[k]`` (hop k's sources besides
        the hidden)."""
        held = {r: set() for r in set(self.ranks)}
        held_before, new_held, delta = [], [], []
        for k in range(self.num_stages):
            r = self.ranks[k]
            held_before.append(frozenset(held[r]))
            new_held.append(frozenset(j for j in self._keep(k) - held[r] if self.consumers(k, j)))
            held[r] |= new_held[k]
            if k + 1 < self.num_stages:
                n = self.n_sources(self.bounds(k)[1])
                delta.append(tuple(j for j in range(n - 1) if j not in held[self.ranks[k + 1]]))
        return {"held_before": tuple(held_before), "new_held": tuple(new_held), "delta": tuple(delta)}

    def _keep(self, k: int) -> set[int]:
        if not self.cache:
            return set()
        j = self.bounds(k)[1]
        keep = set(self.complete(j))
        if not self.keep_exit:
            keep.discard(self.n_sources(j) - 1)
        return keep

    @cached_property
    def _later(self) -> tuple[tuple[int, ...], ...]:
        """Per stage: the later stages of its rank."""
        return tuple(tuple(kk for kk in range(k + 1, self.num_stages) if self.ranks[kk] == self.ranks[k])
                     for k in range(self.num_stages))

    def consumers(self, k: int, j: int) -> tuple[int, ...]:
        """Later stages on stage k's rank that read source j from the store (not as their hidden)."""
        return tuple(kk for kk in self._later[k] if j < self.n_sources(self.bounds(kk)[0]) - 1)

    def held_before(self, k: int) -> frozenset[int]:
        return self.tables["held_before"][k]

    def new_held(self, k: int) -> frozenset[int]:
        return self.tables["new_held"][k]

    def delta(self, k: int) -> tuple[int, ...]:
        return self.tables["delta"][k]

    # ------------------------------------------------------------------ what a stage sees

    def wire_in(self, k: int) -> tuple[int, ...]:
        """Sources stage k receives, in wire order (hidden first); () for the first stage."""
        return () if k == 0 else self.wire_out(k - 1)

    def wire_out(self, k: int) -> tuple[int, ...]:
        """Sources stage k sends, in wire order; () for the last stage."""
        if k == self.num_stages - 1:
            return ()
        return (self.n_sources(self.bounds(k)[1]) - 1, *self.delta(k))

    def cached_in(self, k: int) -> tuple[int, ...]:
        """Sources stage k takes from its rank's store, in order."""
        if k == 0:
            return ()
        hidden = self.n_sources(self.bounds(k)[0]) - 1
        return tuple(sorted(j for j in self.held_before(k) if j != hidden))

    def received_held(self, k: int) -> tuple[tuple[int, int], ...]:
        """(source, wire position) of the sources stage k stores as received: complete on arrival."""
        done = self.complete(self.bounds(k)[0])
        return tuple((j, pos) for pos, j in enumerate(self.wire_in(k)) if j in self.new_held(k) and j in done)

    def computed_held(self, k: int) -> tuple[int, ...]:
        """Sources stage k stores from its own output state (completed by its sublayers)."""
        received = {j for j, _ in self.received_held(k)}
        return tuple(sorted(self.new_held(k) - received))

    def last_on_rank(self, k: int) -> bool:
        return not self._later[k]

    def check(self) -> None:
        """Every source a stage reads arrives on its wire or is in its store (AssertionError otherwise)."""
        for k in range(1, self.num_stages):
            n = self.n_sources(self.bounds(k)[0])
            seen = set(self.wire_in(k)) | set(self.cached_in(k))
            assert seen == set(range(n)), f"stage {k} reads sources {sorted(seen)}, needs 0..{n - 1}"
            assert not set(self.wire_in(k)[1:]) & set(self.cached_in(k)), f"stage {k}: a source arrives twice"

    # ------------------------------------------------------------------ accounting

    def hops(self) -> list[Hop]:
        return [Hop(k, self.wire_out(k), self.ranks[k] == self.ranks[k + 1]) for k in range(self.num_stages - 1)]

    def hop_tensors(self) -> list[int]:
        return [h.tensors for h in self.hops()]

    def hop_bytes(self, tokens: int, hidden_size: int, elem_size: int) -> list[int]:
        """Forward bytes of each hop for ``tokens`` tokens (rows * T) of width ``hidden_size``; 0 for a
        rank-local hop. Backward sends as many."""
        per = tokens * hidden_size * elem_size
        return [0 if h.local else h.tensors * per for h in self.hops()]

    def stored(self) -> int:
        """Leaves a microbatch puts in the stores, over all ranks."""
        return sum(len(self.new_held(k)) for k in range(self.num_stages))
