"""Residual streams: the Block source walk is PAPER Eq. 6, Full is Eq. 1-4, standard is the sum."""

import pytest
import torch

import attnres.residual.base as base
from attnres.residual import BlockAttnRes, FullAttnRes, StandardResidual, build_residual


class Norm:
    """RMSNorm stand-in with the attributes streams use."""

    def __init__(self, d):
        self.weight = torch.ones(d, dtype=torch.float64)
        self.eps = 1e-6

    def __call__(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def walk(scheme, num_sublayers, monkeypatch):
    """Drive a stream with basis-vector outputs; return each read's sources as tuples of sublayer ids.

    The embedding is basis vector 0 and sublayer j writes basis vector j, so a source's nonzero
    entries name exactly the outputs it sums (0 = the embedding).
    """
    seen = []

    def spy(qp, w, eps, residuals):
        seen.append([tuple(torch.nonzero(r).flatten().tolist()) for r in residuals])
        return torch.stack(list(residuals)).mean(0), None

    monkeypatch.setattr(base, "read", spy)
    d = num_sublayers + 1
    eye = torch.eye(d, dtype=torch.float64)
    stream = scheme.start(eye[0])
    for j in range(1, num_sublayers + 1):
        stream.read(Norm(d))
        stream.write(eye[j])
    stream.finish(Norm(d))
    return seen


# PAPER Eq. 6, written out by hand: row l lists the sources read before sublayer l+1 (last row:
# the final aggregation). A source (a, b) is the sum of sublayer outputs a and b; (0,) is b_0.
EQ6_TABLES = {
    (4, 2): [
        [(0,)],
        [(0,), (1,)],
        [(0,), (1, 2)],
        [(0,), (1, 2), (3,)],
        [(0,), (1, 2), (3, 4)],
    ],
    (5, 2): [  # tail block of one sublayer
        [(0,)],
        [(0,), (1,)],
        [(0,), (1, 2)],
        [(0,), (1, 2), (3,)],
        [(0,), (1, 2), (3, 4)],
        [(0,), (1, 2), (3, 4), (5,)],
    ],
    (7, 3): [  # tail block of one sublayer
        [(0,)],
        [(0,), (1,)],
        [(0,), (1, 2)],
        [(0,), (1, 2, 3)],
        [(0,), (1, 2, 3), (4,)],
        [(0,), (1, 2, 3), (4, 5)],
        [(0,), (1, 2, 3), (4, 5, 6)],
        [(0,), (1, 2, 3), (4, 5, 6), (7,)],
    ],
    (6, 4): [  # tail block of two sublayers
        [(0,)],
        [(0,), (1,)],
        [(0,), (1, 2)],
        [(0,), (1, 2, 3)],
        [(0,), (1, 2, 3, 4)],
        [(0,), (1, 2, 3, 4), (5,)],
        [(0,), (1, 2, 3, 4), (5, 6)],
    ],
    (3, 8): [  # one block larger than the model: the embedding stays its own source
        [(0,)],
        [(0,), (1,)],
        [(0,), (1, 2)],
        [(0,), (1, 2, 3)],
    ],
}


@pytest.mark.parametrize("num_sublayers, block_size", sorted(EQ6_TABLES))
def test_block_source_walk_equals_eq6_table(num_sublayers, block_size, monkeypatch):
    scheme = BlockAttnRes(num_sublayers + 1, num_sublayers, block_size)
    assert walk(scheme, num_sublayers, monkeypatch) == EQ6_TABLES[(num_sublayers, block_size)]


@pytest.mark.parametrize("num_sublayers", [1, 4, 7])
def test_full_reads_the_embedding_and_every_earlier_output(num_sublayers, monkeypatch):
    seen = walk(FullAttnRes(num_sublayers + 1, num_sublayers), num_sublayers, monkeypatch)
    assert seen == [[(j,) for j in range(l + 1)] for l in range(num_sublayers + 1)]


@pytest.mark.parametrize("num_sublayers, block_size", [(8, 1), (5, 1), (6, 2), (9, 4), (16, 2)])
def test_block_walk_matches_eq6_for_more_shapes(num_sublayers, block_size, monkeypatch):
    expected = []
    for l in range(num_sublayers + 1):  # l = sublayers done; Eq. 6 with n = l // S, i = l % S
        done, i = divmod(l, block_size)
        blocks = [(0,)] + [tuple(range(b * block_size + 1, (b + 1) * block_size + 1)) for b in range(done)]
        partial = [tuple(range(done * block_size + 1, l + 1))] if i else []
        expected.append(blocks + partial)
    scheme = BlockAttnRes(num_sublayers + 1, num_sublayers, block_size)
    assert walk(scheme, num_sublayers, monkeypatch) == expected


def test_block_size_one_equals_full_exactly():
    d, n = 12, 6
    full, block = FullAttnRes(d, n), BlockAttnRes(d, n, 1)
    with torch.no_grad():
        full.pseudo_query.normal_()
        full.key_norm_weight.uniform_(0.5, 1.5)
    block.load_state_dict(full.state_dict())
    norm = Norm(d)
    norm.weight = norm.weight.float()
    emb = torch.randn(2, 3, d)
    outs = torch.randn(n, 2, 3, d)
    results = []
    for scheme in (full, block):
        s, reads = scheme.start(emb), []
        for j in range(n):
            reads.append(s.read(norm))
            s.write(outs[j] * (1 + reads[-1]))  # outputs depend on the inputs read
        reads.append(s.finish(norm))
        results.append(torch.stack(reads))
    assert torch.equal(results[0], results[1])


def test_standard_stream_is_the_prenorm_sum():
    d = 8
    norm = Norm(d)
    emb = torch.randn(3, d, dtype=torch.float64)
    outs = torch.randn(4, 3, d, dtype=torch.float64)
    s = StandardResidual(d, 4).start(emb)
    for j in range(4):
        torch.testing.assert_close(s.read(norm), norm(emb + outs[:j].sum(0)))
        s.write(outs[j])
    torch.testing.assert_close(s.finish(norm), norm(emb + outs.sum(0)))


@pytest.mark.parametrize("residual", ["full", "block"])
def test_final_aggregation_switch(residual, monkeypatch):
    scheme = build_residual(residual, 5, 4, block_size=2, final_aggregation=False)
    assert scheme.pseudo_query.shape == (4, 5)  # no row for the final read
    d = 5
    eye = torch.eye(d, dtype=torch.float64)
    s = scheme.start(eye[0])
    for j in range(1, 5):
        s.read(Norm(d))
        s.write(eye[j])
    torch.testing.assert_close(s.finish(Norm(d)), Norm(d)(eye.sum(0)))  # plain sum of all sources


def test_attnres_parameters_are_zero_query_one_gain_fp32():
    scheme = build_residual("block", 16, 6, block_size=2)
    assert scheme.pseudo_query.shape == (7, 16) and scheme.key_norm_weight.shape == (7, 16)
    assert scheme.pseudo_query.dtype == torch.float32 and not scheme.pseudo_query.any()
    assert (scheme.key_norm_weight == 1).all()


def test_record_reports_weights_and_hidden_rms_per_read():
    d = 6
    scheme = build_residual("block", d, 4, block_size=2)
    emb = torch.randn(2, 3, d, dtype=torch.float64)
    with scheme.record() as reads:
        s = scheme.start(emb)
        for _ in range(4):
            s.write(s.read(Norm(d)) * 2)
        s.finish(Norm(d))
    assert [r.read for r in reads] == [0, 1, 2, 3, 4]
    assert [r.weights.shape[0] for r in reads] == [1, 2, 2, 3, 3]
    assert reads[0].hidden_rms == pytest.approx(emb.pow(2).mean().sqrt().item(), rel=1e-5)
    assert scheme._records is None


def test_reading_past_the_last_sublayer_is_an_error():
    scheme = build_residual("full", 4, 1)
    s = scheme.start(torch.randn(4))
    s.read(Norm(4))
    s.write(torch.randn(4))
    with pytest.raises(RuntimeError, match="read point 1"):
        s.read(Norm(4))


@pytest.mark.parametrize("bad", [0, -2, 1.5, None])
def test_block_size_must_be_positive(bad):
    with pytest.raises(ValueError, match="block_size"):
        build_residual("block", 4, 4, block_size=bad)


def test_unknown_scheme_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'sum'.*standard, full, block"):
        build_residual("sum", 4, 4)
