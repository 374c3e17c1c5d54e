"""Static KV caches (``cache_implementation="static"``, ``StaticCache``): the cache returns all its slots,
so the mask must cover them (``Cache.get_mask_sizes``). Oracles: transformers' Llama (standard mode),
the dynamic cache, and greedy recomputation without a cache."""

import pytest
import torch
from transformers import StaticCache
from transformers.generation import CompileConfig

from attnres import AttnResForCausalLM

from .test_hf_api import llama_and_ours, padded_batch
from .test_model import MODES, ids, randomize_attnres, tiny

NEW = 5


def greedy(model, x, mask, **kw):
    return model.generate(x, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          eos_token_id=None, **kw)


def recompute(model, x, mask):
    """Greedy decoding by a full forward over the whole sequence per token (no cache)."""
    with torch.no_grad():
        for _ in range(NEW):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(x, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
            x = torch.cat([x, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return x


def test_static_generate_equals_llama_and_dynamic():
    llama, ours = llama_and_ours()
    x, mask = padded_batch()
    ref = greedy(llama, x, mask, cache_implementation="static")
    assert torch.equal(ref, greedy(llama, x, mask))
    assert torch.equal(greedy(ours, x, mask, cache_implementation="static"), ref)
    assert torch.equal(greedy(ours, x, mask), ref)


def batch(b):
    x = ids(b=b, t=6, seed=5)
    mask = torch.ones_like(x)
    if b == 2:
        mask[1, :2] = 0  # left padding
    return x.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("residual", ["block", "full"])
@pytest.mark.parametrize("b", [1, 2])
def test_static_generate_equals_dynamic_and_recomputation(residual, b):
    model = AttnResForCausalLM(tiny(residual)).double().eval()
    randomize_attnres(model)
    x, mask = batch(b)
    static = greedy(model, x, mask, cache_implementation="static")
    assert torch.equal(static, greedy(model, x, mask))
    assert torch.equal(static, recompute(model, x, mask))


@pytest.mark.parametrize("residual", MODES)
def test_forward_with_a_static_cache_and_a_padding_mask_equals_the_full_forward(residual):
    """A direct forward (2D mask, no cache_position): the mask is padded to the cache's slots."""
    model = AttnResForCausalLM(tiny(residual)).double().eval()
    randomize_attnres(model)
    x, mask = batch(2)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(x, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(x[:, :4], attention_mask=mask[:, :4], position_ids=pos[:, :4], cache=cache, use_cache=True)
        for i in (4, 5):
            step = model(x[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=pos[:, i:i + 1],
                         cache=cache, use_cache=True).logits
            torch.testing.assert_close(step, full[:, i:i + 1], rtol=1e-10, atol=1e-10)
    assert int(cache.get_seq_length()) == 6


def test_compiled_decode_with_a_static_cache_is_one_graph_and_equals_eager():
    """fullgraph: the static cache's length stays a tensor (no sync, no branch on it)."""
    model = AttnResForCausalLM(tiny("block")).eval()
    randomize_attnres(model)
    x = ids(b=1, t=5, seed=7)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = StaticCache(config=model.config, max_cache_len=8)
        model(x[:, :3], cache=cache, use_cache=True)
        for i in (3, 4):
            step = compiled(x[:, i:i + 1], cache=cache, use_cache=True).logits
            torch.testing.assert_close(step, full[:, i:i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", MODES)
def test_generate_auto_compiled_decode_with_a_static_cache_equals_dynamic(residual):
    """generate() compiles the decode step for a static cache on GPUs (here forced on CPU, aot_eager,
    fullgraph): its 4D mask spans the cache's slots; left padding, batch 2."""
    model = AttnResForCausalLM(tiny(residual)).eval()
    randomize_attnres(model)
    x, mask = batch(2)
    cc = CompileConfig(backend="aot_eager", fullgraph=True)
    cc._compile_all_devices = True  # transformers otherwise compiles on accelerators only
    static = greedy(model, x, mask, cache_implementation="static", compile_config=cc)
    assert torch.equal(static, greedy(model, x, mask))
