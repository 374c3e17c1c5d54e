"""The rank store on its own (one process, no process group): deposits reach the producer, and every
disagreement with the routing table is an error rather than a wrong gradient."""

from __future__ import annotations

import pytest
import torch

from attnres.distributed.pipeline import Layout, PipelineStoreError, RankStore


@pytest.fixture
def store():
    """P=2, V=2, one block per stage: rank 0 runs stages 0 and 2; stage 0 keeps b_0 and b_1 for stage 2."""
    lay = Layout.build(4, 2, 2, 2)
    assert lay.computed_held(0) == (0, 1) and lay.cached_in(2) == (0, 1)
    return RankStore(lay, 0)


def _sources():
    x = torch.randn(3, requires_grad=True)
    return x, 2 * x, 3 * x  # b_0, b_1 from one leaf, so x.grad shows what reached the producer


def test_deposits_reach_the_producer(store):
    x, b0, b1 = _sources()
    store.put(0, 0, 0, b0)
    store.put(0, 0, 1, b1)
    store.release(0, 0)  # not rank 0's last stage: the leaves stay
    leaves = store.take(2, 0)
    (leaves[0] * 5 + leaves[1] * 7).sum().backward()  # what stage 2's backward leaves on them
    store.deposit(2, 0, tuple(leaf.grad for leaf in leaves))
    store.release(2, 0)
    (b0 + b1).sum().backward()  # stage 0's own backward: the hooks add the deposits
    assert torch.equal(x.grad, torch.full((3,), 2 * (1 + 5) + 3 * (1 + 7.0)))
    store.check_empty()


def test_a_missing_deposit_is_an_error(store):
    x, b0, _ = _sources()
    store.put(0, 0, 0, b0)
    with pytest.raises(PipelineStoreError, match="source 0 of microbatch 0 is collected with 0 of its 1"):
        b0.sum().backward()


def test_the_store_must_hold_what_the_layout_says(store):
    _, b0, _ = _sources()
    store.put(0, 0, 0, b0)
    with pytest.raises(PipelineStoreError, match=r"holds sources \[0\], the layout expects \[0, 1\]"):
        store.take(2, 0)


def test_leftovers_are_an_error(store):
    _, b0, _ = _sources()
    store.put(0, 3, 0, b0)
    with pytest.raises(PipelineStoreError, match="not empty after the step"):
        store.check_empty()


def test_without_autograd_nothing_waits_for_gradients(store):
    with torch.no_grad():
        _, b0, b1 = _sources()
        store.put(0, 0, 0, b0)
        store.put(0, 0, 1, b1)
    assert store.deposits == {} and not store.take(2, 0)[0].requires_grad
    store.release(2, 0)
    store.check_empty()
