"""torch.compile(model): one graph, no graph break in the residual path, same numbers as eager."""

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from attnres import AttnResForCausalLM
from attnres.models.modeling import BANK_MAX_TOKENS, TWO_PHASE_MIN_TOKENS

from .test_model import ids, randomize_attnres, tiny

MODES = ["standard", "full", "block"]
TRAIN_T = max(TWO_PHASE_MIN_TOKENS, BANK_MAX_TOKENS) // 2 + 3  # batch 2: two-phase reads in block mode


def model(residual):
    m = AttnResForCausalLM(tiny(residual, num_hidden_layers=4))
    randomize_attnres(m)
    return m


@pytest.mark.parametrize("residual", MODES)
@pytest.mark.parametrize("decode", [False, True])
def test_forward_traces_to_one_graph_without_breaks(residual, decode):
    m = model(residual)
    x = ids(2, 3 if decode else TRAIN_T)
    with torch.set_grad_enabled(not decode):
        ex = dynamo.explain(m)(x, labels=x, use_cache=False)
    assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]
    assert ex.graph_count == 1


@pytest.mark.parametrize("residual", ["full", "block"])
def test_compiled_training_step_matches_eager_without_recompiles(residual):
    dynamo.reset()
    counters.clear()
    m = model(residual).double()  # float64: eager (fused CPU kernel) and traced (PyTorch ops) agree to rounding
    cm = torch.compile(m, backend="aot_eager")  # dynamo + AOTAutograd (forward and backward graphs), no codegen
    for seed in (0, 1):  # new data, same shapes: no recompile
        x = ids(2, TRAIN_T, seed=seed)
        m.zero_grad()
        cm(x, labels=x, use_cache=False).loss.backward()
        got = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        m(x, labels=x, use_cache=False).loss.backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    assert counters["frames"]["ok"] == 1, dict(counters["frames"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
