"""Two-phase Block AttnRes equals the joint softmax read, forward and every gradient (float64)."""

import pytest
import torch

import attnres.residual.block as block_mod
from attnres import AttnResConfig, AttnResForCausalLM, naive_attn_res
from attnres.ops import two_phase_attn_res

from ..models.test_model import randomize_attnres

pytestmark = pytest.mark.usefixtures("cpu_read_impl")  # fused CPU kernel and PyTorch path

F64 = torch.float64


@pytest.mark.parametrize("n_blocks, s, d", [(1, 1, 7), (1, 3, 130), (4, 2, 33), (9, 4, 1000), (3, 1, 16)])
@pytest.mark.parametrize("output_norm", [False, True])
def test_two_phase_equals_joint_softmax_forward_and_gradients(n_blocks, s, d, output_norm):
    g = torch.Generator().manual_seed(n_blocks * 100 + s)
    blocks = [torch.randn(2, 5, d, dtype=F64, generator=g) * (1 + i) for i in range(n_blocks)]
    # read 0 opens the block (no partial); read j >= 1 sees the partial sum so far
    partials = [None] + [torch.randn(2, 5, d, dtype=F64, generator=g) for _ in range(s - 1)]
    q = torch.randn(s, d, dtype=F64, generator=g)
    gain = 1 + 0.1 * torch.randn(s, d, dtype=F64, generator=g)
    og = 1 + 0.1 * torch.randn(d, dtype=F64, generator=g) if output_norm else None
    leaves = [q, gain, *blocks, *partials[1:]] + ([og] if og is not None else [])
    results = []
    for two_phase in (True, False):
        for t in leaves:
            t.requires_grad_(True)
            t.grad = None
        if two_phase:
            outs = two_phase_attn_res(q, blocks, partials, gain, og, rms_eps=1e-6)
        else:
            sources = [[*blocks] + ([p] if p is not None else []) for p in partials]
            outs = [naive_attn_res(q[j], sources[j], rms_weight=gain[j], output_rms_weight=og, rms_eps=1e-6)
                    for j in range(s)]
        loss = sum((o * torch.randn(o.shape, dtype=F64, generator=torch.Generator().manual_seed(j))).sum()
                   for j, o in enumerate(outs))
        loss.backward()
        results.append(([o.detach() for o in outs], [t.grad.clone() for t in leaves]))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


TINY = dict(vocab_size=61, hidden_size=24, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, residual="block")


@pytest.mark.parametrize("layers, block_size", [(3, 4), (3, 1), (4, 3), (2, 2), (2, 8)])
def test_block_model_two_phase_equals_joint_read_logits_and_every_gradient(layers, block_size, monkeypatch):
    calls = []
    real = block_mod.phase1
    monkeypatch.setattr(block_mod, "phase1", lambda *a: calls.append(1) or real(*a))
    cfg = AttnResConfig(**TINY, num_hidden_layers=layers, attn_res_block_size=block_size)
    model = AttnResForCausalLM(cfg).double()
    randomize_attnres(model)
    x = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(0))  # 80 tokens: two-phase on
    results = []
    for two_phase in (True, False):
        model.config.attn_res_two_phase = two_phase
        model.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    # phase 1 ran once per layer whose two reads see the same completed blocks
    assert len(calls) == sum((2 * i) // block_size == (2 * i + 1) // block_size for i in range(layers))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-8, atol=1e-11, msg=name)


def test_phase1_ignores_autocast():
    """Under bf16 autocast the phase-1 logits stay in the compute dtype (torch.mm would round them to bf16)."""
    from attnres.ops import key_rstd, phase1

    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g).bfloat16()]
    qs = torch.randn(2, 40, generator=g)
    rstd = [key_rstd(b, 1e-6) for b in blocks]
    want = phase1(qs, blocks, rstd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = phase1(qs, blocks, rstd)
    for a, b in zip(got, want, strict=True):
        assert a.s.dtype == torch.float32
        torch.testing.assert_close(a.s, b.s, rtol=0, atol=0)
        torch.testing.assert_close(a.o, b.o, rtol=0, atol=0)
