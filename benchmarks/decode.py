"""Greedy decoding with the KV cache: per-token latency and tokens/s of standard vs Full vs Block AttnRes, batch 1
and 8, fp32 and bf16 weights; every residual x dtype x batch timed in the same interleaved rounds."""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import torch

from .common import (
    DTYPES,
    RESIDUALS,
    build_arm_model,
    interleaved,
    interval_text,
    machine_info,
    md_table,
    median,
    median_interval,
    parse_choices,
    parse_shapes,
    shape_label,
    spread,
    verdict,
    write_json,
)

CACHES = ("dynamic", "static")
ISSUE13_SHAPES = "256x8,768x12,1024x16"  # --decode-shapes issue13
TARGET = 1.05  # issue 13: decode time per token, AttnRes / standard


def resolve(args) -> dict:
    if getattr(args, "_decode_plan", None) is not None:
        return args._decode_plan
    if args.prompt_len < 1 or args.new_tokens < 2:
        raise SystemExit(f"--prompt-len must be >= 1 and --new-tokens >= 2, got {args.prompt_len} and "
                         f"{args.new_tokens}")
    if not args.decode_batches or any(b < 1 for b in args.decode_batches):
        raise SystemExit(f"--decode-batches must be positive integers, got {args.decode_batches}")
    text = "64x4" if args.quick and args.decode_shapes is None else args.decode_shapes or "256x8"
    shapes = parse_shapes("--decode-shapes", ISSUE13_SHAPES if text == "issue13" else text, None, fields=2)
    dtypes = parse_choices("--decode-dtypes", args.decode_dtypes, tuple(DTYPES))
    plan = dict(shapes=shapes, dtypes=dtypes, cache=args.decode_cache)
    args._decode_plan = plan
    return plan


def check(args) -> None:
    resolve(args)


def to_dtype(model, dtype: str):
    """Weights in ``dtype`` as ``from_pretrained(dtype=...)`` gives them: the AttnRes read parameters
    (``_keep_in_fp32_modules_strict``) stay fp32."""
    if DTYPES[dtype] is None:
        return model
    model.to(DTYPES[dtype])
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in keep:
            mod.float()
    return model


def _generate_call(model, ids, n: int, extra: dict):
    """A greedy ``generate`` of exactly ``n`` new tokens from ``ids``."""

    def call():
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=0, **extra)
        assert out.shape[1] == ids.shape[1] + n, out.shape
        return out

    return call


def _run_shape(args, device, shape: dict, plan: dict) -> dict:
    new = 8 if args.quick else args.new_tokens
    batches = args.decode_batches
    label = shape_label(shape)
    vocab = 1024 if args.quick else 8192
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_len), generator=gen).to(device) for b in batches}
    extra = {} if plan["cache"] == "dynamic" else {"cache_implementation": plan["cache"]}
    models, configs, calls = {}, {}, {}
    for res in RESIDUALS:
        for dtype in plan["dtypes"]:
            model, cfg = build_arm_model(res, {}, shape, args.seed, device, args.quick)
            models[res, dtype] = to_dtype(model.eval(), dtype)
            n_params = sum(p.numel() for p in model.parameters())
            configs[f"{res}/{dtype}"] = cfg | {"weights": dtype, "parameters": n_params}
    # the residuals innermost: the generates compared with each other run next to each other in a round
    for dtype in plan["dtypes"]:
        for b in batches:
            for n in (1, new):
                for res in RESIDUALS:
                    key = f"{res}/{dtype}/b{b}/n{n}"
                    calls[key] = _generate_call(models[res, dtype], prompts[b], n, extra)
                    try:
                        calls[key]()  # fails here, in one line, if this model cannot generate with this cache
                    except Exception as e:  # noqa: BLE001 - reported, not hidden
                        msg = str(e).splitlines()[0] if str(e) else ""
                        raise SystemExit(f"decode {label} {key}: generate(cache={plan['cache']}) failed: "
                                         f"{type(e).__name__}: {msg}") from None
    print(f"[decode] {label}: timing {len(calls)} variants x {args.repeats} rounds", flush=True)

    def progress(r, ts):
        print(f"[decode] {label} round {r + 1}/{args.repeats} done", flush=True)

    times = interleaved(calls, repeats=args.repeats, warmup=1, device=device, progress=progress)
    rows = []
    for dtype in plan["dtypes"]:
        for b in batches:
            base, base1 = times[f"standard/{dtype}/b{b}/n{new}"], times[f"standard/{dtype}/b{b}/n1"]
            base_dec = (median(base) - median(base1)) / (new - 1)
            for res in RESIDUALS:
                t, t1 = times[f"{res}/{dtype}/b{b}/n{new}"], times[f"{res}/{dtype}/b{b}/n1"]
                dec = (median(t) - median(t1)) / (new - 1)
                ratios = [a / c for a, c in zip(t, base, strict=True)]
                lo, hi = spread(ratios)
                ci = median_interval(ratios)
                rows.append(
                    {
                        "shape": label,
                        "residual": res,
                        "dtype": dtype,
                        "batch": b,
                        "prompt_len": args.prompt_len,
                        "new_tokens": new,
                        "cache": plan["cache"],
                        "ms_per_token": 1e3 * median(t) / new,
                        "tokens_per_s": b * new / median(t),
                        "ms_prefill_plus_1": 1e3 * median(t1),
                        "ms_per_decode_token": 1e3 * dec,
                        "per_token_vs_standard": median(ratios),
                        "per_token_vs_standard_min": lo,
                        "per_token_vs_standard_max": hi,
                        "per_token_vs_standard_ci95": list(ci),
                        "tokens_per_s_vs_standard": median([c / a for a, c in zip(t, base, strict=True)]),
                        "decode_token_vs_standard": dec / base_dec if base_dec > 0 else math.nan,
                        "times_ms": [1e3 * x for x in t],
                        "times_prefill_plus_1_ms": [1e3 * x for x in t1],
                    }
                )
    return {"shape": label, "arms": configs, "rows": rows}


def run(args, device: torch.device) -> dict:
    plan = resolve(args)
    shapes = []
    for s in plan["shapes"]:
        shapes.append(_run_shape(args, device, s, plan))
        # a long run keeps what it measured if a later shape fails or is stopped
        write_json(Path(args.out) / "decode.partial.json", {"command": machine_info(device)["command"],
                                                           "shapes": shapes})
    rows = [r for s in shapes for r in s["rows"]]
    return {
        "device": str(device),
        "repeats": args.repeats,
        "cache": plan["cache"],
        "dtypes": {d: "weights in bf16, AttnRes read parameters fp32 (as from_pretrained(dtype=bfloat16))"
                   if DTYPES[d] else "fp32 weights" for d in plan["dtypes"]},
        "target_time_vs_standard": TARGET,
        "shapes": [{k: v for k, v in s.items() if k != "rows"} for s in shapes],
        "rows": rows,
        "headline": {
            f"{r['shape']}/{r['dtype']}/{r['residual']}/b{r['batch']}": r["per_token_vs_standard"]
            for r in rows
            if r["residual"] != "standard"
        },
    }


def to_markdown(res: dict) -> str:
    r0 = res["rows"][0]
    head = (
        f"Greedy generate ({res['cache']} KV cache), prompt {r0['prompt_len']} tokens + {r0['new_tokens']} new "
        f"(min_new_tokens = max_new_tokens), random weights, device {res['device']}, median of {res['repeats']} "
        "interleaved rounds (every residual x dtype x batch in each round). fp32 = fp32 weights; bf16 = bf16 "
        "weights with the AttnRes read parameters in fp32 (as from_pretrained(dtype=bfloat16)). 'ms/token' = "
        "whole generate / new tokens; 'time ÷ standard' = median over rounds of the paired ratio of whole "
        "generates [min–max] and a distribution-free 95 % interval of that median ('ci', from 6 rounds; "
        "'unresolved': the target lies in it); 'tokens/s ÷ standard' its inverse per round; 'decode ms/token' = "
        "(median generate(n) - median generate(1)) / (n - 1), without the prefill, and its ratio is the ratio of "
        f"those. Target: time ÷ standard ≤ {TARGET}."
    )
    rows = [
        (
            r["shape"],
            r["dtype"],
            r["batch"],
            r["residual"],
            r["ms_per_token"],
            r["tokens_per_s"],
            f"{r['per_token_vs_standard']:.3f} [{r['per_token_vs_standard_min']:.3f}–"
            f"{r['per_token_vs_standard_max']:.3f}]"
            + ("" if r["residual"] == "standard" else interval_text(r["per_token_vs_standard_ci95"]) + " "
               + verdict(r["per_token_vs_standard"], TARGET, r["per_token_vs_standard_ci95"])),
            r["tokens_per_s_vs_standard"],
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
            ["shape", "dtype", "batch", "residual", "ms/token", "tokens/s", "time ÷ standard",
             "tokens/s ÷ standard", "decode ms/token", "÷ standard", "prefill+1 ms"],
            rows,
        )
    )


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decode")
    g.add_argument("--prompt-len", type=int, default=16)
    g.add_argument("--new-tokens", type=int, default=48, help="new tokens per generate (quick: 8)")
    g.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    g.add_argument("--decode-dtypes", default="fp32,bf16",
                   help="comma-separated weight dtypes: fp32 and/or bf16 (default fp32,bf16)")
    g.add_argument("--decode-shapes", default=None, metavar="HxL,...",
                   help="models, hidden x layers, comma-separated (default 256x8, the reference; quick 64x4); "
                        f"'issue13' = {ISSUE13_SHAPES}")
    g.add_argument("--decode-cache", default="dynamic", choices=CACHES,
                   help="KV cache of generate: dynamic (DynamicCache, the default) or static "
                        "(cache_implementation='static')")
