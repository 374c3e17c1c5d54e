"""The pipeline's routing table (pure Python): counts against PAPER Eq. 7 / Eq. 8, Megatron's widths, the
prototype's runs (DISTRIBUTED.md §3.5), and its invariants over splits, block sizes and placements."""

from __future__ import annotations

import itertools

import pytest

from attnres.distributed.pipeline.layout import Layout, even_split, paper_cached, paper_naive, placement

PV = [(P, V) for P in range(1, 9) for V in range(1, 5)]


def aligned(P: int, V: int, Np: int, *, cache: bool = True, keep_exit: bool = True, style: str = "loop") -> Layout:
    """N_p blocks per stage: one decoder layer per block (S = 2 sublayers), N_p layers per stage."""
    return Layout.build(P * V * Np, P, V, 2, style=style, cache=cache, keep_exit=keep_exit)


@pytest.mark.parametrize(("P", "V"), PV)
@pytest.mark.parametrize("Np", [1, 2, 3])
def test_naive_is_eq7_plus_the_embedding(P, V, Np):
    """Without the cache hop k carries b_0 and every block so far: Σ = Eq. 7 + (C - 1), peak C * N_p + 1."""
    hops = aligned(P, V, Np, cache=False).hop_tensors()
    C = P * V
    assert sum(hops) == paper_naive(P, V, Np) + (C - 1)
    assert hops == [1 + (k + 1) * Np for k in range(C - 1)]


@pytest.mark.parametrize(("P", "V"), PV)
def test_cached_paper_accounting_is_eq8_plus_the_embedding(P, V):
    """Not keeping a stage's own exit block (the paper's, Megatron's accounting): Σ = Eq. 8 + (P - 1)."""
    hops = aligned(P, V, 1, keep_exit=False).hop_tensors()
    assert sum(hops) == paper_cached(P, V, 1) + (P - 1)
    assert max(hops, default=0) <= P  # the peak falls from C to P
    if V > 1:
        assert sum(hops) < sum(aligned(P, V, 1, cache=False).hop_tensors())


@pytest.mark.parametrize(("P", "V"), [(P, V) for P, V in PV if P > 1])
@pytest.mark.parametrize("Np", [1, 2, 3])
def test_cached_counts_for_n_blocks_per_stage(P, V, Np):
    """Aligned stages of N_p blocks: the first round is naive; after it a hop carries the (P-1) N_p blocks the
    other ranks made, plus the receiver's own exit block unless the rank kept it."""
    first = [1 + (k + 1) * Np for k in range(P - 1)]
    later = (V - 1) * P
    paper = aligned(P, V, Np, keep_exit=False).hop_tensors()
    kept = aligned(P, V, Np).hop_tensors()
    assert paper == first + [(P - 1) * Np + 1] * later
    assert kept == first + [(P - 1) * Np] * later
    assert sum(kept) == sum(first) + later * (P - 1) * Np
    if Np == 1:  # the paper's later hops carry P blocks; keeping the exit block saves one per hop
        assert sum(kept) == paper_cached(P, V, 1) + (P - 1) - later


@pytest.mark.parametrize(("S", "widths"), [(4, [3, 3, 3]), (6, [3, 2, 2])])
def test_megatron_widths(S, widths):
    """Megatron-LM PR #6840's TestAttnResVppSchedule: 16 layers, P=2, V=2, blocks of k = S/2 layers."""
    assert Layout.build(16, 2, 2, S, keep_exit=False).hop_tensors() == widths


@pytest.mark.parametrize(
    ("P", "V", "layers", "S", "style", "naive", "cached"),
    [
        (2, 2, 4, 2, "loop", [2, 3, 4], [2, 2, 2]),
        (2, 3, 6, 2, "loop", [2, 3, 4, 5, 6], [2, 2, 2, 2, 2]),
        (2, 3, 6, 3, "loop", None, [2, 2, 1, 2, 2]),
        (2, 2, 4, 3, "loop", [2, 3, 3], [2, 2, 1]),
        (2, 2, 4, 2, "v", None, [2, 1, 3]),
        (2, 2, 4, 3, "v", None, [2, 1, 2]),
        (2, 1, 2, 3, "loop", [2], [2]),
    ],
)
def test_prototype_runs(P, V, layers, S, style, naive, cached):
    """The counts of the prototype's runs (DISTRIBUTED.md §3.5), which do not keep the exit block."""
    if naive is not None:
        assert Layout.build(layers, P, V, S, style=style, cache=False).hop_tensors() == naive
    assert Layout.build(layers, P, V, S, style=style, keep_exit=False).hop_tensors() == cached


def test_keep_exit_sends_a_rank_nothing_it_made():
    """P=2, V=2, one block per stage: after the first hop each hop carries only the new block (the hidden)."""
    lay = aligned(2, 2, 1)
    assert lay.hop_tensors() == [2, 1, 1]
    assert [lay.delta(k) for k in range(3)] == [(0,), (), ()]
    assert lay.held_before(2) == {0, 1} and lay.cached_in(2) == (0, 1)
    assert lay.held_before(3) == {0, 1, 2} and lay.cached_in(3) == (0, 1, 2)


def test_block_straddling_stages():
    """S=3, one layer (2 sublayers) per stage: stage 1 starts inside block 1, so its hidden is a partial
    sum and must not be stored; stage 1 completes block 1 itself."""
    lay = Layout.build(4, 2, 2, 3)
    assert [lay.bounds(k) for k in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert lay.wire_in(1) == (1, 0)  # the partial b_1, then b_0
    assert lay.received_held(1) == ((0, 1),)  # b_0, at wire position 1
    assert lay.computed_held(1) == (1,)  # b_1, completed at sublayer 2
    assert lay.computed_held(0) == (0,)  # the embedding, read again by stage 2
    assert lay.hop_tensors() == [2, 2, 1]


def test_v_shape_turn_is_local():
    lay = Layout.build(4, 2, 2, 2, style="v")
    assert lay.ranks == (0, 1, 1, 0)
    assert [h.local for h in lay.hops()] == [False, True, False]
    assert lay.hop_bytes(tokens=10, hidden_size=4, elem_size=2) == [2 * 80, 0, 2 * 80]


def test_standard_residual_sends_one_tensor():
    for cache in (True, False):
        lay = Layout.build(8, 2, 2, None, cache=cache)
        assert lay.hop_tensors() == [1, 1, 1] and lay.stored() == 0


@pytest.mark.parametrize(("P", "V"), [(2, 2), (4, 2), (2, 4), (8, 4)])
def test_v_placement_matches_torch(P, V):
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    want = generate_stage_to_rank_mapping(P, P * V, style="v")
    assert placement(P, P * V, "v") == tuple(want[k] for k in range(P * V))
    assert placement(P, P * V) == tuple(k % P for k in range(P * V))


def _splits(C: int, layers: int):
    """A few splits of ``layers`` into C stages: even (if it divides), front- and back-loaded."""
    base = [layers // C] * C
    for i in range(layers % C):
        base[i] += 1
    yield tuple(base)
    yield tuple(reversed(base))
    if layers >= C + 2:
        yield (layers - C + 1, *[1] * (C - 1))


@pytest.mark.parametrize(("P", "V"), PV)
def test_invariants(P, V):
    """Any split, block size, placement and policy: every source a stage reads arrives on its wire or from
    its store, only completed sources are stored and each has a reader, and the cache never sends more."""
    C = P * V
    for layers, S, style in itertools.product((C, C + 3), (None, 1, 2, 3, 5), ("loop", "v")):
        for split in _splits(C, layers):
            kwargs = {"P": P, "V": V, "S": S, "style": style, "split": split}
            naive = _layout(layers, cache=False, **kwargs)
            naive.check()
            assert naive.stored() == 0
            for keep_exit in (True, False):
                lay = _layout(layers, keep_exit=keep_exit, **kwargs)
                lay.check()
                _check_store(lay)
                assert all(c <= n for c, n in zip(lay.hop_tensors(), naive.hop_tensors(), strict=True))


def _layout(layers, *, P, V, S, style, split, cache=True, keep_exit=True) -> Layout:
    return Layout(split, placement(P, P * V, style), S, cache, keep_exit)


def _check_store(lay: Layout) -> None:
    for k in range(lay.num_stages):
        j_in, j_out = lay.bounds(k)
        assert lay.new_held(k) <= lay.complete(j_out)
        assert all(j in lay.complete(j_in) for j, _ in lay.received_held(k))
        assert all(lay.consumers(k, j) for j in lay.new_held(k))
        assert not lay.new_held(k) & lay.held_before(k)


def test_even_split_and_placement_errors():
    assert even_split(8, 4) == (2, 2, 2, 2)
    with pytest.raises(ValueError, match="do not split"):
        even_split(10, 4)
    with pytest.raises(ValueError, match="covers 7 layers"):
        Layout.build(8, 2, 2, 2, split=(2, 2, 2, 1))
    with pytest.raises(ValueError, match="multiple of the ranks"):
        placement(2, 3, "v")
