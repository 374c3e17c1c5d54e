"""Models in bf16: the fused CPU read takes the 16-bit and mixed reads (autocast training, a bf16 model's
no-grad prefill and cached decode) and agrees with the PyTorch read on the same model."""

import pytest
import torch

from attnres import AttnResForCausalLM
from attnres.ops import cpu_kernel

from ..models.test_model import ids, randomize_attnres, tiny

pytestmark = pytest.mark.skipif(cpu_kernel.load() is None, reason="the fused CPU read is unavailable")

# Both paths compute in fp32 from the same bf16 values; they differ by fp32 summation order, which can
# flip a bf16 rounding of a read's output and travel through the following bf16 sublayers.
TOL = dict(rtol=3e-2, atol=3e-2)


def _counting(monkeypatch):
    """Count the fused reads (plain and carried) and their backwards, and note the sources' dtypes."""
    calls = {"forward": 0, "backward": 0, "dtypes": set()}
    bwd = cpu_kernel.backward

    def counted(fn, first):  # args[first:]: the sources (then a carried read's carriers, of the same dtypes)
        def apply(*args):
            calls["forward"] += 1
            calls["dtypes"].add(tuple(t.dtype for t in args[first:]))
            return fn(*args)
        return apply

    def backward(*a, **k):
        calls["backward"] += 1
        return bwd(*a, **k)

    for fn, first in ((cpu_kernel.CpuRead, 4), (cpu_kernel.CpuCarriedRead, 5)):
        monkeypatch.setattr(fn, "apply", counted(fn.apply, first))
    monkeypatch.setattr(cpu_kernel, "backward", backward)
    return calls


@pytest.mark.parametrize("residual", ["full", "block"])
def test_autocast_training_step_fused_equals_pytorch_read(residual, monkeypatch):
    m = AttnResForCausalLM(tiny(residual, num_hidden_layers=3))
    randomize_attnres(m)
    x = ids(2, 40)  # 80 tokens: Block runs two-phase (fused backward of the merged reads)
    calls = _counting(monkeypatch)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(cpu_kernel, "_enabled", fused)
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, labels=x)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert calls["forward"] > 0 and calls["backward"] == 2 * 3 + 1
    # the embedding is fp32 under autocast, the sublayer outputs bf16: mixed sources, read in place
    assert any(torch.float32 in d and torch.bfloat16 in d for d in calls["dtypes"])
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, **TOL)
    for n, g in g1.items():
        torch.testing.assert_close(g, g2[n], rtol=5e-2, atol=5e-3, msg=n)


@pytest.mark.parametrize("residual", ["full", "block"])
def test_bf16_model_prefill_and_decode_fused_equals_pytorch_read(residual, monkeypatch):
    m = AttnResForCausalLM(tiny(residual, num_hidden_layers=3)).bfloat16()
    randomize_attnres(m)
    prompt = ids(1, 40)  # 40 tokens: prefill and decode steps read the fp32 bank
    calls = _counting(monkeypatch)
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(cpu_kernel, "_enabled", fused)
        with torch.no_grad():
            logits = m(ids(2, 40)).logits  # 80 tokens, no grad: bf16 sources (Block: two-phase)
            gen = m.generate(prompt, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        outs.append((logits.float(), torch.stack(gen.logits).float()))
    assert calls["forward"] > 0 and {torch.bfloat16} <= {d for ds in calls["dtypes"] for d in ds}
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("residual", ["full", "block"])
def test_autocast_sublayer_inputs_in_the_autocast_dtype(residual, kernel, monkeypatch):
    """Under autocast a fused read writes the sublayer's input in bf16, which its matmuls would cast it to: the
    same forward bit for bit as writing fp32 and casting, gradients within bf16 rounding (the gradients of the
    sublayer's matmuls now add up in bf16), and ``last_hidden_state`` still in fp32."""
    from attnres.residual import block

    monkeypatch.setattr(cpu_kernel, "_enabled", kernel)
    m = AttnResForCausalLM(tiny(residual, num_hidden_layers=3))
    randomize_attnres(m)
    x = ids(2, 40)  # 80 tokens: Block runs two-phase (merged reads)
    seen = []
    hooks = [mod.register_forward_pre_hook(lambda _m, a: seen.append(a[0].dtype))
             for layer in m.model.layers for mod in (layer.self_attn, layer.mlp)]
    results = []
    for autocast_dtype in (True, False):
        if not autocast_dtype:
            monkeypatch.setattr(block, "sublayer_dtype", lambda x, ct: None)
        m.zero_grad()
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, labels=x)
            hidden = m.model(x).last_hidden_state
        out.loss.backward()
        assert hidden.dtype == torch.float32
        assert seen == [torch.bfloat16 if autocast_dtype else torch.float32] * 12  # two forwards, 6 sublayers
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    for h in hooks:
        h.remove()
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    for n, g in g1.items():
        torch.testing.assert_close(g, g2[n], rtol=5e-2, atol=5e-3, msg=n)
