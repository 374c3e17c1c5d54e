"""collect_probes: shapes, faithfulness to manual computations, and no side effects on training state."""

import json
import math

import pytest
import torch
from torch import nn

from attnres.analysis import collect_probes

from ._tiny import randomize_attnres, tiny_model, token_ids

MODES = ["standard", "full", "block"]


def _rms(x: torch.Tensor) -> float:
    return x.detach().float().pow(2).mean().sqrt().item()


@pytest.mark.parametrize("residual", MODES)
@pytest.mark.parametrize("layers", [2, 3])
def test_probe_lists_have_one_entry_per_sublayer_and_read_point(residual, layers):
    probes = collect_probes(tiny_model(residual, layers=layers), token_ids())
    n = 2 * layers
    assert len(probes["output_rms"]) == n
    assert len(probes["grad_norm"]) == n
    assert len(probes["hidden_rms"]) == n + 1
    for key in ("output_rms", "grad_norm", "hidden_rms"):
        assert all(math.isfinite(v) and v > 0 for v in probes[key]), key
    if residual == "standard":
        assert probes["depth_weights"] is None
    else:
        assert len(probes["depth_weights"]) == n + 1


@pytest.mark.parametrize("residual", MODES)
def test_probes_survive_a_json_round_trip(residual):
    model = tiny_model(residual)
    randomize_attnres(model)
    probes = collect_probes(model, token_ids())
    assert json.loads(json.dumps(probes)) == probes


@pytest.mark.parametrize("residual", ["standard", "block"])
def test_probes_leave_grads_parameters_and_mode_unchanged(residual):
    model = tiny_model(residual).train()
    params = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    # a training step in progress: some gradients accumulated, others not yet created
    grads = {}
    for i, (k, p) in enumerate(params.items()):
        if i % 2 == 0:
            p.grad = torch.randn_like(p)
            grads[k] = (p.grad, p.grad.clone())
    collect_probes(model, token_ids())
    assert model.training
    for k, p in params.items():
        assert torch.equal(p.detach(), before[k]), k
        if k in grads:
            obj, value = grads[k]
            assert p.grad is obj, k
            assert torch.equal(p.grad, value), k
        else:
            assert p.grad is None, k
    model.eval()
    collect_probes(model, token_ids())
    assert not model.training


def test_probes_work_inside_no_grad_and_inference_mode():
    model = tiny_model("full")
    randomize_attnres(model)
    ref = collect_probes(model, token_ids())
    with torch.no_grad():
        a = collect_probes(model, token_ids())
    with torch.inference_mode():
        b = collect_probes(model, token_ids())
    for key in ("output_rms", "hidden_rms", "grad_norm"):
        assert a[key] == pytest.approx(ref[key], rel=1e-6)
        assert b[key] == pytest.approx(ref[key], rel=1e-6)


def test_probes_see_through_a_module_wrapper():
    class Wrapper(nn.Module):  # DDP-style: the model sits at .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model("block")
    assert collect_probes(Wrapper(model), token_ids()) == collect_probes(model, token_ids())


@pytest.mark.parametrize("residual", MODES)
def test_probe_loss_is_the_models_loss(residual):
    model = tiny_model(residual)
    randomize_attnres(model)
    x = token_ids(t=80)  # >= 64 tokens: the unrecorded Block forward takes the two-phase path
    with torch.no_grad():
        loss = model(input_ids=x, labels=x, use_cache=False).loss.item()
    assert collect_probes(model, x)["loss"] == pytest.approx(loss, rel=1e-5)


def test_full_depth_weights_sum_to_one_and_read_j_has_j_plus_1_sources():
    model = tiny_model("full", layers=3)
    randomize_attnres(model)
    dw = collect_probes(model, token_ids())["depth_weights"]
    assert [len(w) for w in dw] == [j + 1 for j in range(7)]
    for w in dw:
        assert sum(w) == pytest.approx(1.0, abs=1e-5)
        assert min(w) >= 0
    # weights depend on the randomised queries: not the uniform init
    assert any(abs(w[-1] - 1 / len(w)) > 1e-3 for w in dw[1:])


@pytest.mark.parametrize(
    "layers, block_size, sources",
    [
        # S = 4, L = 6: b0 alone, then b0 + partial of block 1 (x3), block 1 completes at sublayer 4,
        # the shorter tail block 2 has 2 sublayers; the final read sees b0, b1, b2
        (3, 4, [1, 2, 2, 2, 2, 3, 3]),
        # S = 2, L = 6: reads alternate "new block opens" / "partial joins"
        (3, 2, [1, 2, 2, 3, 3, 4, 4]),
        # S = 3, L = 4: block 1 = sublayers 0-2, tail block 2 = sublayer 3
        (2, 3, [1, 2, 2, 2, 3]),
    ],
)
def test_block_depth_weights_follow_the_block_walk(layers, block_size, sources):
    model = tiny_model("block", layers=layers, block_size=block_size)
    randomize_attnres(model)
    probes = collect_probes(model, token_ids())
    assert probes["block_size"] == block_size
    dw = probes["depth_weights"]
    assert [len(w) for w in dw] == sources
    for w in dw:
        assert sum(w) == pytest.approx(1.0, abs=1e-5)


def test_standard_residual_has_no_depth_weights():
    probes = collect_probes(tiny_model("standard"), token_ids())
    assert probes["depth_weights"] is None
    assert probes["block_size"] is None


@pytest.mark.parametrize("residual", ["full", "block"])
def test_zero_init_depth_weights_are_uniform(residual):
    dw = collect_probes(tiny_model(residual), token_ids())["depth_weights"]
    for w in dw:
        assert w == pytest.approx([1 / len(w)] * len(w), abs=1e-6)


def test_final_output_without_aggregation_has_no_weights():
    model = tiny_model("full", layers=2, attn_res_final_aggregation=False)
    probes = collect_probes(model, token_ids())
    assert len(probes["hidden_rms"]) == 5
    assert probes["depth_weights"][-1] is None
    assert [len(w) for w in probes["depth_weights"][:-1]] == [1, 2, 3, 4]


def _manual_standard_forward(model, x):
    """The standard PreNorm residual written out: outputs f_l, hidden states h_l, and the loss."""
    inner = model.model
    h = inner.embed_tokens(x)
    rope = inner._rope(torch.arange(x.shape[1])[None], h.dtype)
    outs, hidden = [], []
    for layer in inner.layers:
        hidden.append(h)
        a = layer.self_attn(layer.input_layernorm(h), rope, None, True, None)
        outs.append(a)
        h = h + a
        hidden.append(h)
        m = layer.mlp(layer.post_attention_layernorm(h))
        outs.append(m)
        h = h + m
    hidden.append(h)
    logits = model.lm_head(inner.norm(h))
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    return outs, hidden, loss


def test_output_rms_matches_the_sublayer_outputs_computed_by_hand():
    model = tiny_model("standard", layers=2)
    x = token_ids()
    probes = collect_probes(model, x)
    with torch.no_grad():
        outs, _, _ = _manual_standard_forward(model, x)
    assert probes["output_rms"] == pytest.approx([_rms(f) for f in outs], rel=1e-5)
    # the attention and MLP sublayers are told apart: their magnitudes differ at init
    assert probes["output_rms"][0] != pytest.approx(probes["output_rms"][1], rel=1e-2)


def test_standard_hidden_rms_is_the_rms_of_the_running_sum():
    model = tiny_model("standard", layers=3)
    x = token_ids()
    probes = collect_probes(model, x)
    with torch.no_grad():
        _, hidden, loss = _manual_standard_forward(model, x)
    assert probes["hidden_rms"] == pytest.approx([_rms(h) for h in hidden], rel=1e-5)
    assert probes["loss"] == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("residual", ["standard", "block"])
def test_grad_norm_is_the_norm_of_each_sublayers_weight_gradient(residual):
    model = tiny_model(residual, layers=2)
    randomize_attnres(model)
    x = token_ids()
    probes = collect_probes(model, x)
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    expected = []
    for layer in model.model.layers:
        for sub in (layer.self_attn, layer.mlp):
            expected.append(torch.cat([p.grad.flatten() for p in sub.parameters()]).norm().item())
    assert probes["grad_norm"] == pytest.approx(expected, rel=1e-4)


def test_probes_reject_a_batch_without_a_sequence_dimension():
    with pytest.raises(ValueError, match="batch, seq"):
        collect_probes(tiny_model("standard"), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        collect_probes(tiny_model("standard"), torch.zeros(2, 1, dtype=torch.long))


def test_full_read_1_weights_are_the_reference_read_over_embedding_then_attention_output():
    from attnres import naive_attn_res

    model = tiny_model("full", layers=2)
    randomize_attnres(model)
    x = token_ids()
    dw = collect_probes(model, x)["depth_weights"]
    inner = model.model
    with torch.no_grad():
        emb = inner.embed_tokens(x)
        layer = inner.layers[0]
        rope = inner._rope(torch.arange(x.shape[1])[None], emb.dtype)
        # read 0 has only the embedding, so attention 0 sees the normalised embedding
        attn = layer.self_attn(layer.input_layernorm(emb), rope, None, True, None)
        read = layer.mlp_res  # read point 1: before layer 0's MLP
        _, p = naive_attn_res(read.pseudo_query, [emb, attn], read.key_norm_weight,
                              rms_eps=layer.post_attention_layernorm.eps, return_weights=True)
    expected = p.flatten(1).mean(1).tolist()
    assert abs(expected[0] - expected[1]) > 1e-3  # the two sources are told apart
    assert dw[1] == pytest.approx(expected, abs=1e-5)
