"""Helpers shared by the training tests: a tiny config and a random-words corpus (no network)."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import torch.nn.functional as F
from torch import nn

WORDS = """
the of and to in a is that for it as was with be by on
not he this are or his from at which but have an they you were her
she there would their we him been has when who will more no if out so
said what up its about into than them can only other new some could time these
two may then do first any my now such like our over man me even most
made after also did many before must through back years where much your way well down
should because each just those people how too little state good very make world still own
""".split()

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    attn_res_num_blocks=2,
    tokenizer="byte",
    batch_size=4,
    seq_len=32,
    max_steps=8,
    warmup_steps=2,
    eval_every=4,
    eval_batches=2,
    checkpoint_every=4,
    probes=False,
)


def write_corpus(root: Path, docs: int = 6, lines: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        text = "\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(lines)
        )
        (root / f"doc{i}.txt").write_text(text + "\n")
    return root


def losses(out: Path) -> list[tuple[int, float]]:
    from attnres.train import read_metrics

    return [(r["step"], r["train_loss"]) for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]


class Float64Loss(nn.Module):
    """The next-token loss in the logits' dtype (the model's own loss upcasts the logits to float32 only)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels, use_cache):
        logits = self.model(ids, use_cache=use_cache).logits
        return SimpleNamespace(loss=F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()))
