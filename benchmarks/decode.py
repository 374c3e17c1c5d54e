"""Greedy decoding with the KV cache: per-token latency of standard vs Full vs Block AttnRes."""

from __future__ import annotations

import argparse
import math
import warnings

import torch

from .common import RESIDUALS, build_model, interleaved, md_table, median, model_kwargs, paired_ratio


def run(args, device: torch.device) -> dict:
    new = 8 if args.quick else args.new_tokens
    batches = args.decode_batches
    repeats = max(1, args.repeats if not args.quick else 2)
    calls = {}
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {
        b: torch.randint(0, model_kwargs(args.quick)["vocab_size"], (b, args.prompt_len), generator=gen).to(device)
        for b in batches
    }
    for res in RESIDUALS:
        model = build_model(res, args.seed, device, args.quick).eval()
        for b in batches:
            for n in (1, new):

                def call(model=model, ids=prompts[b], n=n):
                    with torch.inference_mode(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        out = model.generate(
                            ids,
                            attention_mask=torch.ones_like(ids),
                            max_new_tokens=n,
                            min_new_tokens=n,
                            do_sample=False,
                            use_cache=True,
                            pad_token_id=0,
                        )
                    assert out.shape[1] == ids.shape[1] + n, out.shape
                    return out

                calls[f"{res}/b{b}/n{n}"] = call
    print(f"[decode] timing {len(calls)} variants x {repeats} rounds", flush=True)
    times = interleaved(calls, repeats=repeats, warmup=1, device=device)
    rows = []
    for b in batches:
        base, base1 = times[f"standard/b{b}/n{new}"], times[f"standard/b{b}/n1"]
        base_dec = (median(base) - median(base1)) / (new - 1)
        for res in RESIDUALS:
            t, t1 = times[f"{res}/b{b}/n{new}"], times[f"{res}/b{b}/n1"]
            dec = (median(t) - median(t1)) / (new - 1)
            rows.append(
                {
                    "residual": res,
                    "batch": b,
                    "prompt_len": args.prompt_len,
                    "new_tokens": new,
                    "ms_per_token": 1e3 * median(t) / new,
                    "ms_prefill_plus_1": 1e3 * median(t1),
                    "ms_per_decode_token": 1e3 * dec,
                    "per_token_vs_standard": paired_ratio(t, base),
                    "decode_token_vs_standard": dec / base_dec if base_dec > 0 else math.nan,
                    "times_ms": [1e3 * x for x in t],
                    "times_prefill_plus_1_ms": [1e3 * x for x in t1],
                }
            )
    return {
        "model": model_kwargs(args.quick),
        "device": str(device),
        "repeats": repeats,
        "rows": rows,
        "headline": {
            f"{r['residual']}/b{r['batch']}": r["per_token_vs_standard"] for r in rows if r["residual"] != "standard"
        },
    }


def to_markdown(res: dict) -> str:
    r0 = res["rows"][0]
    head = (
        f"Greedy generate (KV cache), prompt {r0['prompt_len']} tokens + {r0['new_tokens']} new "
        f"(min_new_tokens = max_new_tokens), random weights, device {res['device']}, median of {res['repeats']} "
        "interleaved rounds. 'ms/token' = whole generate / new tokens; 'decode ms/token' = (median generate(n) - "
        "median generate(1)) / (n - 1), i.e. without the prefill, and its ratio is the ratio of those; "
        "'÷ standard' of ms/token is the median over rounds of the paired time ratio."
    )
    rows = [
        (
            r["residual"],
            r["batch"],
            r["ms_per_token"],
            r["per_token_vs_standard"],
            r["ms_per_decode_token"],
            r["decode_token_vs_standard"],
            r["ms_prefill_plus_1"],
        )
        for r in res["rows"]
    ]
    return (
        head
        + "\n\n"
        + md_table(
            ["residual", "batch", "ms/token", "÷ standard", "decode ms/token", "÷ standard", "prefill+1 ms"], rows
        )
    )


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decode")
    g.add_argument("--prompt-len", type=int, default=16)
    g.add_argument("--new-tokens", type=int, default=48, help="new tokens per generate (quick: 8)")
    g.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
