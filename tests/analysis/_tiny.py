"""Tiny models and inputs shared by the analysis tests."""

import torch

from attnres import AttnResConfig, AttnResForCausalLM

VOCAB = 64


def tiny_model(residual="standard", layers=3, block_size=4, **kw) -> AttnResForCausalLM:
    cfg = AttnResConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=128, residual=residual,
        attn_res_block_size=block_size if residual == "block" else None, **kw,
    )
    return AttnResForCausalLM(cfg)


def randomize_attnres(model) -> None:
    """Move the pseudo-queries and key-norm gains off their init so depth weights depend on the input."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pseudo_query" in name:
                p.normal_(0, 0.5)
            elif "key_norm_weight" in name:
                p.uniform_(0.5, 1.5)


def token_ids(b=2, t=8, seed=0) -> torch.LongTensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))
