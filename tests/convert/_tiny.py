"""Tiny models for the converter tests: every weight random (norm gains and AttnRes gains too), so a
wrong name, a swapped gain or a missing permutation changes the logits."""

from __future__ import annotations

import torch

from attnres import AttnResConfig, AttnResForCausalLM

# residual cases: L = 3 decoder layers = 6 sublayers
CASES = {
    "standard": {"residual": "standard"},
    "block-aligned": {"residual": "block", "attn_res_block_size": 4},  # 2 layers per block, a 1-layer tail
    "block-unaligned": {"residual": "block", "attn_res_block_size": 3},  # blocks cut layers in half
    "block-one": {"residual": "block", "attn_res_block_size": 6},  # one block of all 3 layers
    "full": {"residual": "full"},
}
LAYER_UNITS = ("k3", "torchtitan", "gguf")  # layouts that count blocks in decoder layers


def tiny_config(case: str = "block-aligned", final: bool = True, **kw) -> AttnResConfig:
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0, attn_res_final_aggregation=final)
    return AttnResConfig(**{**base, **CASES[case], **kw})


def random_model(config: AttnResConfig, seed: int = 0, dtype=torch.float32) -> AttnResForCausalLM:
    torch.manual_seed(seed)
    model = AttnResForCausalLM(config).eval().to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pseudo_query"):
                p.normal_(0, 0.5)
            elif name.endswith(("key_norm_weight", "layernorm.weight", "norm.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def expressible(layout: str, case: str) -> bool:
    return not (layout in LAYER_UNITS and case in ("block-unaligned", "full"))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def load(config: AttnResConfig, state_dict: dict, dtype=torch.float32) -> AttnResForCausalLM:
    model = AttnResForCausalLM(config).eval().to(dtype)
    model.load_state_dict(state_dict, strict=True)
    return model
