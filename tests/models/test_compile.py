"""torch.compile(model): one graph, no graph break in the residual path, same numbers as eager; the
fused CPU read runs inside the compiled graph as its attnres:: custom ops."""

from collections import Counter

import pytest
import torch
import torch._dynamo as dynamo
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

from attnres import AttnResForCausalLM
from attnres.models.modeling import BANK_MAX_TOKENS, TWO_PHASE_MIN_TOKENS
from attnres.ops import cpu_kernel

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


def _called(node) -> str:
    """The op a graph node calls: a mutating op's (``auto_functionalized``'s first argument) for its wrapper."""
    return str(node.args[0] if "auto_functionalized" in str(node.target) else node.target)


def counting_backend():
    """aot_eager that records, per compiled graph (forward, then backward), the attnres:: op calls."""
    graphs = []

    def keep(gm, _):
        graphs.append(Counter(_called(n) for n in gm.graph.nodes
                              if n.op == "call_function" and _called(n).startswith("attnres.")))
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep), graphs


needs_kernel = pytest.mark.skipif(cpu_kernel.load() is None, reason="the fused CPU read is unavailable")


@needs_kernel
@pytest.mark.parametrize("residual", ["full", "block"])
def test_compiled_model_calls_the_fused_read_ops(residual):
    """Every AttnRes read is an attnres:: op in the graphs: Full's 9 reads forward and backward; Block's
    joint reads forward, its two-phase merges (merge_forward) and phase 1 (one per block), and every read's
    backward: the last one's (its carriers unused) makes the source gradients, the others add into them."""
    dynamo.reset()
    backend, graphs = counting_backend()
    m = model(residual).double()
    x = ids(2, TRAIN_T)
    torch.compile(m, backend=backend, fullgraph=True)(x, labels=x, use_cache=False).loss.backward()
    reads = 2 * 4 + 1  # 4 layers, two reads each, and the final aggregation
    fw, bw = graphs
    merged = 8 if residual == "block" else 0  # block_size 2: both reads of every layer merge
    assert fw["attnres.read_forward.default"] == reads - merged
    assert fw.get("attnres.merge_forward.default", 0) == merged
    assert fw.get("attnres.phase1.default", 0) == (4 if residual == "block" else 0)  # one per 2-sublayer block
    assert bw["attnres.read_backward.default"] == 1 and bw["attnres.read_backward_into.default"] == reads - 1
    with torch.no_grad():  # cached decode: the bank's stacked read
        dynamo.reset()
        backend, graphs = counting_backend()
        torch.compile(m, backend=backend, fullgraph=True)(ids(2, 3), use_cache=False)
    assert graphs[0]["attnres.read_stacked.default"] == reads


@needs_kernel
def test_set_compiled_false_traces_the_pytorch_read(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_compiled", False)
    dynamo.reset()
    backend, graphs = counting_backend()
    m = model("block").double()
    x = ids(2, TRAIN_T)
    torch.compile(m, backend=backend, fullgraph=True)(x, labels=x, use_cache=False).loss.backward()
    assert graphs and all(not g for g in graphs)


@needs_kernel
@pytest.mark.parametrize("residual", ["full", "block"])
def test_varying_sequence_length_compiles_at_most_twice(residual):
    """dynamic=None: the second length recompiles once with dynamic shapes (the fake kernels take
    symbolic sizes), and further lengths reuse it."""
    dynamo.reset()
    counters.clear()
    m = model(residual)
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    for t in (TRAIN_T, TRAIN_T + 5, TRAIN_T + 11, TRAIN_T + 30):
        x = ids(2, t, seed=t)
        cm(x, labels=x, use_cache=False).loss.backward()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def _step(fn, m, x, autocast):
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(x, labels=x, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@needs_kernel
@pytest.mark.parametrize("residual", ["full", "block"])
def test_compiled_bf16_autocast_step_matches_eager(residual):
    """Under bf16 autocast (fp32 embedding + bf16 sublayer outputs: mixed sources) the compiled step
    calls the same kernel as eager (aot_eager: the traced graphs run op by op): equal loss and gradients."""
    dynamo.reset()
    backend, graphs = counting_backend()
    m = model(residual)
    x = ids(2, TRAIN_T)
    l1, g1 = _step(torch.compile(m, backend=backend, fullgraph=True), m, x, True)
    l2, g2 = _step(m, m, x, True)
    assert graphs[0]["attnres.read_forward.default"] > 0
    assert graphs[1]["attnres.read_backward.default"] + graphs[1]["attnres.read_backward_into.default"] == 9
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
    for n, g in g1.items():
        torch.testing.assert_close(g, g2[n], rtol=1e-5, atol=1e-7, msg=n)


@needs_kernel
def test_inductor_step_calls_the_kernel_and_matches_eager():
    """Inductor's generated code calls the ops; fp32 loss and gradients match eager to reduction order.
    (Under bf16 autocast inductor's own numerics move small gradients by up to ~20% of their largest
    element, with or without the ops, so that comparison is made with aot_eager above.)"""
    from torch._inductor.utils import run_and_get_code

    dynamo.reset()
    m = model("block")
    x = ids(2, TRAIN_T)
    cm = torch.compile(m, fullgraph=True)
    (l1, g1), code = run_and_get_code(lambda: _step(cm, m, x, False))
    l2, g2 = _step(m, m, x, False)
    code = "\n".join(code)
    assert "attnres.read_forward" in code and "attnres.read_backward" in code
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for n, g in g1.items():
        torch.testing.assert_close(g, g2[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("residual", ["full", "block"])
def test_cuda_compiled_step_calls_the_triton_ops_and_matches_eager(monkeypatch, residual):
    """With triton_read.set_compiled(True) a compiled CUDA step runs the Triton kernels as attnres:: ops
    (forward and backward graphs) and its gradients equal the eager step's."""
    pytest.importorskip("triton")
    from attnres.ops import triton_read

    monkeypatch.setattr(triton_read, "_compiled", True)
    dynamo.reset()
    backend, graphs = counting_backend()
    m = model(residual).cuda()
    x = ids(2, TRAIN_T).cuda()
    torch.compile(m, backend=backend, fullgraph=True)(x, labels=x, use_cache=False).loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    fw, bw = graphs
    assert fw["attnres.read_forward.default"] + fw.get("attnres.merge_forward.default", 0) == 2 * 4 + 1
    assert bw["attnres.read_backward.default"] == 2 * 4 + 1
    m.zero_grad()
    m(x, labels=x, use_cache=False).loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
