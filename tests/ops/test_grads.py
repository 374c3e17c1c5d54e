"""Gradients go back to the input they belong to by name, whatever the argument order (ops/grads.py)."""

import pytest
import torch

from attnres.ops import cpu_kernel
from attnres.ops.grads import Needs, Slots


class _Shuffled(torch.autograd.Function):
    """A read-shaped function whose arguments are in another order, with an extra one before the sources."""

    @staticmethod
    def forward(ctx, eps, w, extra, qp, *sources):
        ctx.save_for_backward(qp, w, *sources)
        return qp.sum() + 2 * w.sum() + sum((3 + i) * s.sum() for i, s in enumerate(sources))

    @staticmethod
    def backward(ctx, g):
        qp, w, *sources = ctx.saved_tensors
        needs = SLOTS.needs(ctx)
        assert needs == Needs(True, False, (False, True, True))
        grads = [torch.full_like(s, float(3 + i)) * g if need else None
                 for i, (s, need) in enumerate(zip(sources, needs.sources, strict=True))]
        return SLOTS.grads(torch.ones_like(qp) * g, None, grads)


SLOTS = Slots.of_function(_Shuffled.forward)


def test_slots_follow_the_signature():
    qp = torch.randn(4, requires_grad=True)
    w = torch.randn(4)
    src = [torch.randn(2, 4, requires_grad=i > 0) for i in range(3)]
    _Shuffled.apply(0.5, w, "anything", qp, *src).backward()
    assert torch.equal(qp.grad, torch.ones(4))
    assert src[0].grad is None
    assert torch.equal(src[1].grad, torch.full((2, 4), 4.0)) and torch.equal(src[2].grad, torch.full((2, 4), 5.0))


def test_slots_refuse_a_read_without_the_names():
    with pytest.raises(TypeError, match="lacks"):
        Slots.of_function(lambda ctx, q, w, *sources: None)
    with pytest.raises(TypeError, match="must end with"):
        Slots.of_function(lambda ctx, qp, w, sources: None)


def test_slots_of_the_custom_op_schema():
    slots = Slots.of_op(cpu_kernel.OPS.read_forward.default)
    assert slots.names == ("qp", "w", "eps", "sources", "dtype", "carry") and not slots.star

    class Ctx:  # called without the defaulted dtype and carry: one flag, and one gradient, per argument given
        needs_input_grad = (False, True, False, [True, False])

    assert slots.needs(Ctx) == Needs(False, True, (True, False))
    assert slots.grads(None, "dw", ["a", None], 4) == (None, "dw", None, ["a", None])
    Ctx.needs_input_grad = (False, True, False, [True, False], False)
    assert slots.needs(Ctx) == Needs(False, True, (True, False))
    assert slots.grads(None, "dw", ["a", None], 5) == (None, "dw", None, ["a", None], None)
    Ctx.needs_input_grad = (False, True, False, [True, False], False, [False])  # one carrier, of sources[0]
    assert slots.needs(Ctx) == Needs(False, True, (True, False), (False,))
    assert slots.grads(None, "dw", [None, "b"], carry=["a"]) == (None, "dw", None, [None, "b"], None, ["a"])
    Ctx.needs_input_grad = (False, True, False)
    with pytest.raises(TypeError, match="needs_input_grad has 3 entries, the op 6 arguments"):
        slots.needs(Ctx)


def test_needs_route_a_carried_sources_total_through_its_carrier():
    needs = Needs(True, False, (True, True, False), carry=(True, False))
    assert needs.wanted() == (True, False, False)  # carried: the carrier's flag; the others: the source's
    assert needs.route(["t0", "t1", "t2"]) == ([None, None, "t2"], ["t0", "t1"])
    plain = Needs(True, False, (True, False))
    assert plain.wanted() == (True, False) and plain.route(["t0", None]) == (["t0", None], [])
