"""The no-grad bank state (cached decode) computes the same reads as the stream state."""

import pytest
import torch

from attnres.residual import BlockAttnRes, FullAttnRes, Mode, Pass, RMSNorm

from .test_streams import drive, queries

pytestmark = pytest.mark.usefixtures("cpu_read_impl")  # fused CPU kernel and PyTorch path


def Norm(d, gen, dtype=torch.float64):
    norm = RMSNorm(d).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(d, dtype=torch.float64, generator=gen))
    return norm


@pytest.mark.parametrize("final_aggregation", [True, False])
@pytest.mark.parametrize("scheme_args", [("full", 1), ("full", 7), ("block", 4, 2), ("block", 5, 2), ("block", 7, 3),
                                         ("block", 6, 4), ("block", 3, 8), ("block", 6, 1)])
def test_bank_reads_equal_the_stream_reads(scheme_args, final_aggregation):
    gen = torch.Generator().manual_seed(len(scheme_args) * 10 + scheme_args[1])
    d, n = 24, scheme_args[1]
    if scheme_args[0] == "full":
        scheme = FullAttnRes(n, final_aggregation)
    else:
        scheme = BlockAttnRes(n, scheme_args[2], final_aggregation)
    qs = queries(n + 1, d, gen)
    embedding = torch.randn(2, 3, d, dtype=torch.float64, generator=gen)
    outputs = [torch.randn(2, 3, d, dtype=torch.float64, generator=gen) * (j + 1) for j in range(n)]
    norms = [Norm(d, gen) for _ in range(n + 1)]
    sublayer = lambda j, x: outputs[j] + 0.1 * x  # noqa: E731 - outputs depend on the reads

    want = drive(scheme, embedding, sublayer, norms, qs, Pass(Mode.STREAM))
    with torch.no_grad():
        got = drive(scheme, embedding, sublayer, norms, qs, Pass(Mode.BANK))
    assert len(got) == len(want) == n + 1
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w.detach(), rtol=1e-12, atol=1e-12, msg=f"read {j}")


def test_bank_state_is_one_preallocated_tensor_written_in_place():
    scheme = BlockAttnRes(4, 2)
    ctx = Pass(Mode.BANK)
    with torch.no_grad():
        state = scheme.start(torch.randn(1, 2, 8), ctx)
        bank = state[0]
        assert bank.shape == (1 + 2, 1, 2, 8)
        for j in range(4):
            state = scheme.write(state, j, torch.ones(1, 2, 8), ctx)
            assert state[0] is bank
    assert torch.equal(bank[1:], torch.full((2, 1, 2, 8), 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bank_keeps_the_activation_dtype(dtype):
    scheme = BlockAttnRes(4, 2)
    norm = Norm(16, torch.Generator().manual_seed(0), dtype)
    q = queries(1, 16)[0].float()
    ctx = Pass(Mode.BANK)
    with torch.no_grad():
        state = scheme.start(torch.randn(1, 2, 16).to(dtype), ctx)
        assert state[0].dtype == torch.float32  # the bank is in the compute dtype
        x = scheme.read(state, 0, q, norm, ctx)
        state = scheme.write(state, 0, x, ctx)
        assert x.dtype == dtype and scheme.read(state, 1, q, norm, ctx).dtype == dtype
