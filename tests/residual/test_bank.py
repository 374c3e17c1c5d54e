"""The no-grad bank stream (decode) computes the same reads as the autograd streams."""

import pytest
import torch

from attnres.models.modeling import RMSNorm
from attnres.residual import BlockAttnRes, FullAttnRes
from attnres.residual.bank import BANK_MAX_TOKENS, BankStream

pytestmark = pytest.mark.usefixtures("cpu_read_impl")  # fused CPU kernel and PyTorch path


def Norm(d, gen, dtype=torch.float64):
    norm = RMSNorm(d).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(d, dtype=torch.float64, generator=gen))
    return norm


def drive(scheme, embedding, outputs, norms):
    stream = scheme.start(embedding)
    reads = []
    for out, norm in zip(outputs, norms[:-1], strict=True):
        reads.append(stream.read(norm))
        stream.write(out)
    reads.append(stream.finish(norms[-1]))
    return type(stream), reads


@pytest.mark.parametrize("final_aggregation", [True, False])
@pytest.mark.parametrize("scheme_args", [("full", 1), ("full", 7), ("block", 4, 2), ("block", 5, 2), ("block", 7, 3),
                                         ("block", 6, 4), ("block", 3, 8), ("block", 6, 1)])
def test_bank_reads_equal_the_autograd_stream(scheme_args, final_aggregation):
    gen = torch.Generator().manual_seed(len(scheme_args) * 10 + scheme_args[1])
    d = 24
    if scheme_args[0] == "full":
        scheme = FullAttnRes(d, scheme_args[1], final_aggregation)
    else:
        scheme = BlockAttnRes(d, scheme_args[1], scheme_args[2], final_aggregation)
    scheme = scheme.double()
    with torch.no_grad():
        scheme.pseudo_query.normal_(generator=gen)
        scheme.key_norm_weight.uniform_(0.5, 1.5, generator=gen)
    n = scheme.num_sublayers
    embedding = torch.randn(2, 3, d, dtype=torch.float64, generator=gen)
    outputs = [torch.randn(2, 3, d, dtype=torch.float64, generator=gen) * (j + 1) for j in range(n)]
    norms = [Norm(d, gen) for _ in range(n + 1)]

    kind, want = drive(scheme, embedding, outputs, norms)
    assert kind is not BankStream
    with torch.no_grad():
        kind, got = drive(scheme, embedding, outputs, norms)
    assert kind is BankStream
    assert len(got) == len(want) == n + 1
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"read {j}")


def test_bank_only_for_small_no_grad_inputs():
    scheme = BlockAttnRes(8, 4, 2)
    with torch.no_grad():
        assert isinstance(scheme.start(torch.zeros(1, BANK_MAX_TOKENS - 1, 8)), BankStream)
        assert not isinstance(scheme.start(torch.zeros(1, BANK_MAX_TOKENS, 8)), BankStream)
        with scheme.record():
            assert not isinstance(scheme.start(torch.zeros(1, 1, 8)), BankStream)
    assert not isinstance(scheme.start(torch.zeros(1, 1, 8)), BankStream)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bank_keeps_the_stream_dtype(dtype):
    scheme = BlockAttnRes(16, 4, 2)
    norm = Norm(16, torch.Generator().manual_seed(0), dtype)
    with torch.no_grad():
        stream = scheme.start(torch.randn(1, 2, 16).to(dtype))
        x = stream.read(norm)
        stream.write(x)
        assert stream.read(norm).dtype == dtype and stream.finish(norm).dtype == dtype


@pytest.mark.parametrize("final_aggregation", [True, False])
def test_bank_finish_before_the_last_sublayer_reads_what_was_written(final_aggregation):
    gen = torch.Generator().manual_seed(3)
    scheme = FullAttnRes(16, 6, final_aggregation).double()
    with torch.no_grad():
        scheme.pseudo_query.normal_(generator=gen)
    embedding = torch.randn(1, 2, 16, dtype=torch.float64, generator=gen)
    outputs = [torch.randn(1, 2, 16, dtype=torch.float64, generator=gen) for _ in range(2)]
    norm = Norm(16, gen)
    results = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            stream = scheme.start(embedding)
            for out in outputs:
                stream.read(norm)
                stream.write(out)
            results.append(stream.finish(norm))
    assert type(stream) is BankStream
    torch.testing.assert_close(results[1], results[0].detach(), rtol=1e-12, atol=1e-12)


def test_bank_read_past_the_last_sublayer_is_an_error():
    scheme = BlockAttnRes(8, 2, 1)
    norm = Norm(8, torch.Generator().manual_seed(0), torch.float32)
    with torch.no_grad():
        stream = scheme.start(torch.randn(1, 1, 8))
        for _ in range(2):
            stream.write(stream.read(norm))
        with pytest.raises(RuntimeError, match="read point 2 does not exist"):
            stream.read(norm)
