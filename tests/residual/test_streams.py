"""Residual schemes: the Block source walk is PAPER Eq. 6, Full is Eq. 1-4, standard is the sum."""

import pytest
import torch

import attnres.residual.block as block_mod
from attnres.residual import (
    BlockAttnRes,
    DepthQuery,
    FullAttnRes,
    Mode,
    Pass,
    RMSNorm,
    StandardResidual,
    build_residual,
)

STREAM = Pass(Mode.STREAM)


def Norm(d, dtype=torch.float64):
    return RMSNorm(d).to(dtype)


def queries(n, d, gen=None):
    """n read points' DepthQuery modules (float64), off their init when ``gen`` is given."""
    qs = [DepthQuery(d).double() for _ in range(n)]
    if gen is not None:
        with torch.no_grad():
            for q in qs:
                q.pseudo_query.normal_(generator=gen)
                q.key_norm_weight.uniform_(0.5, 1.5, generator=gen)
    return qs


def drive(scheme, embedding, sublayer, norms, qs, ctx=STREAM):
    """Run the scheme over ``num_sublayers`` sublayers; output j = sublayer(j, input read); return the reads."""
    state, reads = scheme.start(embedding, ctx), []
    for j in range(scheme.num_sublayers):
        reads.append(scheme.read(state, j, qs[j], norms[j], ctx))
        state = scheme.write(state, j, sublayer(j, reads[-1]), ctx)
    reads.append(scheme.finish(state, qs[-1], norms[-1], ctx))
    return reads


def walk(scheme, num_sublayers, monkeypatch):
    """Drive a scheme with basis-vector outputs; return each read's sources as tuples of sublayer ids.

    The embedding is basis vector 0 and sublayer j writes basis vector j, so a source's nonzero
    entries name exactly the outputs it sums (0 = the embedding).
    """
    seen = []

    def spy(qp, w, eps, residuals, dtype=None, carry=None):
        seen.append([tuple(torch.nonzero(r).flatten().tolist()) for r in residuals])
        return (torch.stack(list(residuals)).mean(0), None) + (() if carry is None else (None,))

    monkeypatch.setattr(block_mod, "attn_read", spy)
    d = num_sublayers + 1
    eye = torch.eye(d, dtype=torch.float64)
    drive(scheme, eye[0], lambda j, x: eye[j + 1], [Norm(d)] * d, queries(d, d))
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
    scheme = BlockAttnRes(num_sublayers, block_size)
    assert walk(scheme, num_sublayers, monkeypatch) == EQ6_TABLES[(num_sublayers, block_size)]


@pytest.mark.parametrize("num_sublayers", [1, 4, 7])
def test_full_reads_the_embedding_and_every_earlier_output(num_sublayers, monkeypatch):
    seen = walk(FullAttnRes(num_sublayers), num_sublayers, monkeypatch)
    assert seen == [[(j,) for j in range(l + 1)] for l in range(num_sublayers + 1)]


@pytest.mark.parametrize("num_sublayers, block_size", [(8, 1), (5, 1), (6, 2), (9, 4), (16, 2)])
def test_block_walk_matches_eq6_for_more_shapes(num_sublayers, block_size, monkeypatch):
    expected = []
    for l in range(num_sublayers + 1):  # l = sublayers done; Eq. 6 with n = l // S, i = l % S
        done, i = divmod(l, block_size)
        blocks = [(0,)] + [tuple(range(b * block_size + 1, (b + 1) * block_size + 1)) for b in range(done)]
        partial = [tuple(range(done * block_size + 1, l + 1))] if i else []
        expected.append(blocks + partial)
    scheme = BlockAttnRes(num_sublayers, block_size)
    assert walk(scheme, num_sublayers, monkeypatch) == expected


def test_standard_state_is_the_prenorm_sum():
    d, norm = 8, Norm(8)
    emb = torch.randn(3, d, dtype=torch.float64)
    outs = torch.randn(4, 3, d, dtype=torch.float64)
    scheme = StandardResidual(4)
    state = scheme.start(emb, STREAM)
    for j in range(4):
        torch.testing.assert_close(scheme.read(state, j, None, norm, STREAM), norm(emb + outs[:j].sum(0)))
        state = scheme.write(state, j, outs[j], STREAM)
        assert len(state) == 1
    torch.testing.assert_close(scheme.finish(state, None, norm, STREAM), norm(emb + outs.sum(0)))


@pytest.mark.parametrize("num_sublayers, block_size", [(4, 2), (7, 3), (5, 1), (3, 8)])
def test_block_state_is_the_source_list(num_sublayers, block_size):
    """After j writes the state holds b_0, the completed blocks and (when j % S != 0) the partial sum."""
    d = 4
    scheme = BlockAttnRes(num_sublayers, block_size)
    state = scheme.start(torch.zeros(d), STREAM)
    for j in range(num_sublayers):
        state = scheme.write(state, j, torch.full((d,), float(j + 1)), STREAM)
        done = j + 1
        blocks = [0.0] + [float(sum(range(b * block_size + 1, (b + 1) * block_size + 1)))
                          for b in range(done // block_size)]
        partial = [float(sum(range(done // block_size * block_size + 1, done + 1)))] if done % block_size else []
        assert [t[0].item() for t in state] == blocks + partial


@pytest.mark.parametrize("residual", ["full", "block"])
def test_final_aggregation_switch(residual):
    scheme = build_residual(residual, 4, block_size=2, final_aggregation=False)
    assert not scheme.final_aggregation
    d = 5
    eye = torch.eye(d, dtype=torch.float64)
    reads = drive(scheme, eye[0], lambda j, x: eye[j + 1], [Norm(d)] * d, queries(4, d) + [None])
    torch.testing.assert_close(reads[-1], Norm(d)(eye.sum(0)))  # plain sum of all sources


def test_depth_query_is_zero_query_one_gain_fp32():
    q = DepthQuery(16)
    assert q.pseudo_query.shape == q.key_norm_weight.shape == (16,)
    assert q.pseudo_query.dtype == torch.float32 and not q.pseudo_query.any()
    assert (q.key_norm_weight == 1).all()


def test_record_reports_weights_and_hidden_rms_per_read():
    d = 6
    scheme = build_residual("block", 4, block_size=2)
    emb = torch.randn(2, 3, d, dtype=torch.float64)
    ctx = Pass(Mode.STREAM, records=[])
    drive(scheme, emb, lambda j, x: x * 2, [Norm(d)] * 5, queries(5, d), ctx)
    reads = ctx.records
    assert [r.read for r in reads] == [0, 1, 2, 3, 4]
    assert [r.weights.shape[0] for r in reads] == [1, 2, 2, 3, 3]
    assert reads[0].hidden_rms == pytest.approx(emb.pow(2).mean().sqrt().item(), rel=1e-5)


@pytest.mark.parametrize("mode", [Mode.STREAM, Mode.BANK])
def test_reading_past_the_last_sublayer_is_an_error(mode):
    scheme = build_residual("full", 1)
    ctx = Pass(mode)
    with torch.no_grad():
        state = scheme.start(torch.randn(1, 1, 4), ctx)
        q = DepthQuery(4)
        state = scheme.write(state, 0, scheme.read(state, 0, q, Norm(4, torch.float32), ctx), ctx)
        with pytest.raises(RuntimeError, match="read point 1"):
            scheme.read(state, 1, q, Norm(4, torch.float32), ctx)


@pytest.mark.parametrize("bad", [0, -2, 1.5, None])
def test_block_size_must_be_positive(bad):
    with pytest.raises(ValueError, match="block_size"):
        build_residual("block", 4, block_size=bad)


def test_unknown_scheme_names_the_allowed_ones():
    with pytest.raises(ValueError, match="standard, block, full, .*'sum'"):
        build_residual("sum", 4)
