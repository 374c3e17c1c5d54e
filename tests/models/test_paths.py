"""Every path the model can take (stream, two-phase, bank, recording, activation checkpointing) against a
plain forward written with ``naive_attn_res`` and explicit source lists (PAPER Eq. 1-6), in float64."""

import warnings

import pytest
import torch

from attnres import AttnResForCausalLM, naive_attn_res
from attnres.models import enable_activation_checkpointing
from attnres.ops import cpu_kernel
from attnres.residual import Mode

from .test_model import ids, randomize_attnres, tiny

pytestmark = pytest.mark.usefixtures("cpu_read_impl")  # fused CPU kernel and PyTorch path

LONG = 40  # batch 2 x 40 = 80 tokens: two-phase with grad, the stream without the two-phase key
SHORT = 5  # 10 tokens: the bank without grad
SHAPES = [  # (residual, extra config): block sizes that do and do not line up with layers, a tail block
    ("standard", {}),
    ("full", {}),
    ("full", {"attn_res_final_aggregation": False}),
    ("block", {"attn_res_block_size": 2}),
    ("block", {"attn_res_block_size": 3}),
    ("block", {"attn_res_block_size": 4, "attn_res_final_aggregation": False}),
    ("block", {"attn_res_block_size": 100}),
]


def reference_logits(model, x):
    """The model's function with the residual connections written out plainly."""
    inner, cfg = model.model, model.config
    emb = inner.embed_tokens(x)
    rope = inner._rope(torch.arange(x.shape[1])[None], emb.dtype)

    def mix(query, sources):
        if query is None:  # standard, or no final aggregation: the plain sum
            return sum(sources[1:], sources[0])
        return naive_attn_res(query.pseudo_query, sources, query.key_norm_weight, rms_eps=cfg.rms_norm_eps)

    sublayers = []
    for layer in inner.layers:
        sublayers.append((layer.attn_res, layer.input_layernorm,
                          lambda h, layer=layer: layer.self_attn(h, rope, None, True, None)))
        sublayers.append((layer.mlp_res, layer.post_attention_layernorm, layer.mlp))
    size = cfg.block_size or len(sublayers) + 1  # standard: one block that never completes
    blocks, partial = [emb], None
    for j, (query, norm, f) in enumerate(sublayers):
        out = f(norm(mix(query, blocks + ([partial] if partial is not None else []))))
        partial = out if partial is None else partial + out
        if (j + 1) % size == 0:
            blocks, partial = blocks + [partial], None
    return model.lm_head(inner.norm(mix(inner.output_res, blocks + ([partial] if partial is not None else []))))


def build(residual, extra, seed=0):
    torch.manual_seed(seed)
    model = AttnResForCausalLM(tiny(residual, num_hidden_layers=4, **extra)).double()
    randomize_attnres(model)
    return model


def modes_of(model, monkeypatch):
    """Record the stream mode each forward of ``model`` chooses."""
    seen = []
    real = model.model.stream_mode
    monkeypatch.setattr(model.model, "stream_mode", lambda e: seen.append(real(e)) or seen[-1])
    return seen


def grads_of(model, logits, seed=0):
    weight = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    (logits * weight).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, want, **tol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name, **tol)


@pytest.mark.parametrize("residual, extra", SHAPES)
@pytest.mark.parametrize("two_phase", [True, False])
@pytest.mark.parametrize("carry", [True, False])
def test_training_paths_equal_the_reference_forward_and_every_gradient(residual, extra, two_phase, carry,
                                                                      monkeypatch):
    """Every training path, with the fused reads carried (ops/grads.py, the default) and not."""
    monkeypatch.setattr(cpu_kernel, "_carry", carry)
    model = build(residual, extra)
    model.config.attn_res_two_phase = two_phase
    seen = modes_of(model, monkeypatch)
    for t in (LONG, SHORT):
        x = ids(t=t)
        want_logits = reference_logits(model, x)
        want = grads_of(model, want_logits)
        got_logits = model(x, use_cache=False).logits
        got = grads_of(model, got_logits)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-10, atol=1e-10)
        assert_same(got, want, rtol=1e-8, atol=1e-10)
    assert seen == [Mode.TWO_PHASE if two_phase else Mode.STREAM, Mode.STREAM]


@pytest.mark.parametrize("residual, extra", SHAPES)
def test_no_grad_paths_equal_the_reference(residual, extra, monkeypatch):
    model = build(residual, extra).eval()
    seen = modes_of(model, monkeypatch)
    with torch.no_grad():
        for t in (LONG, SHORT):  # prefill (two-phase) and the bank
            x = ids(t=t)
            torch.testing.assert_close(model(x, use_cache=False).logits, reference_logits(model, x),
                                       rtol=1e-10, atol=1e-10)
        with model.model.record() as reads:  # recording: the plain stream, reads reported
            x = ids(t=SHORT)
            torch.testing.assert_close(model(x).logits, reference_logits(model, x), rtol=1e-10, atol=1e-10)
    assert seen == [Mode.TWO_PHASE, Mode.BANK, Mode.STREAM]
    assert [r.read for r in reads] == list(range(2 * 4 + 1))


@pytest.mark.parametrize("residual, extra", SHAPES)
def test_a_foreign_or_hooked_norm_is_called_not_fused(residual, extra):
    """Only attnres's own RMSNorm is fused into a read: a LayerNorm in its place, or a hook on it, runs."""
    model = build(residual, extra).eval()
    layer = model.model.layers[1]
    layer.post_attention_layernorm = torch.nn.LayerNorm(48, dtype=torch.float64)
    calls = []
    layer.input_layernorm.register_forward_hook(lambda m, a, out: calls.append(out))
    for t, grad in ((LONG, True), (LONG, False), (SHORT, True), (SHORT, False)):
        x = ids(t=t)
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(model(x, use_cache=False).logits, reference_logits(model, x),
                                       rtol=1e-10, atol=1e-10)
    assert len(calls) == 8  # once per forward, in every path


def _checkpointing(model, reentrant):
    enable_activation_checkpointing(model, use_reentrant=reentrant)


@pytest.mark.parametrize("residual, extra", SHAPES)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients_recomputing_each_layer(residual, extra, reentrant,
                                                                                 monkeypatch):
    # a checkpointed forward never carries its reads: neither does the one it is held to (same summation order)
    monkeypatch.setattr(cpu_kernel, "_carry", False)
    model = build(residual, extra).train()
    x = ids(t=LONG)
    want_logits = model(x, labels=x).logits
    want = grads_of(model, want_logits)
    _checkpointing(model, reentrant)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    runs = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda m, a: runs.append(1))
    got_logits = model(x, labels=x).logits
    assert len(runs) == 4
    got = grads_of(model, got_logits)
    assert len(runs) == 8  # every layer ran again in backward (a pre-hook: recompute may stop early)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=0)
    assert_same(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("residual", ["full", "block"])
def test_only_plain_training_forwards_carry_their_reads(residual, cpu_read_impl, monkeypatch):
    """A training forward chains its fused reads with carriers; no-grad, recorded and checkpointed forwards, the
    PyTorch read and ``set_carry(False)`` do not (and all give the reference's function)."""
    carried = []
    for fn in (cpu_kernel.CpuCarriedRead, cpu_kernel.CpuCarriedMerge):  # Block's two-phase reads merge
        monkeypatch.setattr(fn, "apply", lambda *a, real=fn.apply: carried.append(1) or real(*a))
    model = build(residual, {}).train()
    x = ids(t=LONG)

    def reads(**kw):
        carried.clear()
        with torch.set_grad_enabled(kw.get("grad", True)):
            model(x, use_cache=False)
        return len(carried)

    assert reads() == (2 * 4 + 1 if cpu_read_impl == "fused" else 0)  # every read and the final one
    assert reads(grad=False) == 0
    with model.model.record():
        assert reads() == 0
    monkeypatch.setattr(cpu_kernel, "_carry", False)
    assert reads() == 0
    monkeypatch.setattr(cpu_kernel, "_carry", True)
    _checkpointing(model, reentrant=False)
    assert reads() == 0


def test_gradient_checkpointing_enable_is_the_hf_entry_point():
    model = build("block", {})
    with warnings.catch_warnings():  # transformers >= 5.24 deprecates this name for activation_checkpointing_*
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)


def saved_bytes(fn) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("residual", ["standard", "full", "block"])
def test_activation_checkpointing_saves_less_for_backward(residual):
    model = build(residual, {}).train()
    x = ids(t=LONG)
    plain = saved_bytes(lambda: model.model(x, use_cache=False).last_hidden_state)
    _checkpointing(model, reentrant=False)
    checkpointed = saved_bytes(lambda: model.model(x, use_cache=False).last_hidden_state)
    assert checkpointed < 0.5 * plain


def test_checkpointing_turns_the_kv_cache_off_in_training_only():
    model = build("block", {})
    _checkpointing(model, reentrant=False)
    x = ids(t=SHORT)
    assert model.train()(x, use_cache=True).past_key_values is None
    with torch.no_grad():
        assert model(x, use_cache=True).past_key_values is not None

