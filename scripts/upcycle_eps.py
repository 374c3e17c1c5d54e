"""The numbers of README "Upcycling a pretrained model": SmolLM2-135M upcycled to standard / block / full
(zero init) against transformers' model on 8 windows of 256 tokens of the corpus's last play (The Winter's
Tale): perplexity and the max relative logit difference (max |ours - theirs| / max |theirs|), fp32.

    .venv/bin/python scripts/upcycle_eps.py            # ~2 min on 2 CPU cores; fetches what is not cached
"""

import math
import time

import torch
import torch.nn.functional as F

from attnres.convert.upcycle import load_source, upcycle_model
from attnres.data._io import default_data_dir
from attnres.data.sources import download_shakespeare, shakespeare_documents


def main() -> None:
    torch.manual_seed(0)
    source, tokenizer, desc = load_source("smollm2-135m")
    text = shakespeare_documents(download_shakespeare(default_data_dir() / "downloads"))[-1].text
    ids = torch.tensor(tokenizer(text[:200_000])["input_ids"][: 8 * 256]).view(8, 256)

    def logits(model):
        with torch.no_grad():
            return torch.cat([model(row[None], use_cache=False).logits for row in ids])

    def ppl(lg):
        return math.exp(F.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())

    ref = logits(source)
    print(f"{desc}, {ids.numel()} tokens\ntransformers   ppl {ppl(ref):.4f}")
    for residual in ("standard", "block", "full"):
        start = time.perf_counter()
        model = upcycle_model(source, residual)
        took = time.perf_counter() - start
        lg = logits(model)
        diff = ((lg - ref).abs().max() / ref.abs().max()).item()
        print(f"{residual:<14} ppl {ppl(lg):.4f}  max relative logit difference {diff:.2e}  (upcycle {took:.1f} s)")


if __name__ == "__main__":
    main()
