"""Tiny models and inputs shared by the analysis tests."""

import torch

from attnres import AttnResConfig, AttnResForCausalLM

from ..models.test_model import randomize_attnres  # noqa: F401  (re-exported for the analysis tests)

VOCAB = 64


def tiny_model(residual="standard", layers=3, block_size=4, **kw) -> AttnResForCausalLM:
    cfg = AttnResConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=128, residual=residual,
        attn_res_block_size=block_size if residual == "block" else None, **kw,
    )
    return AttnResForCausalLM(cfg)


def token_ids(b=2, t=8, seed=0) -> torch.LongTensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))
