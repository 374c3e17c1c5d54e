"""Training step (forward, backward, AdamW step) of standard vs Full vs Block AttnRes at the reference config,
plus any ``--arms`` (other schemes, Table 4 options: what they cost against the same standard step)."""

from __future__ import annotations

import argparse
import time

import torch

from .common import RESIDUALS, build_model, interleaved, md_table, median, model_kwargs, paired_ratio, sync


def _make_step(model, opt, ids):
    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run(args, device: torch.device) -> dict:
    batch, seq = (2, 128) if args.quick else (args.batch, args.seq)
    modes = ["eager"] + ([] if args.quick or args.compile_mode == "none" else ["compiled"])
    ids = torch.randint(
        0, model_kwargs(args.quick)["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(args.seed)
    ).to(device)
    calls, compile_s, losses = {}, {}, {}
    arms = list(RESIDUALS) + [a for a in args.arms if a not in RESIDUALS]
    for res in arms:
        model = build_model(res, args.seed, device, args.quick).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        for mode in modes:
            m = model
            if mode == "compiled":
                kw = {} if args.compile_mode == "default" else {"mode": args.compile_mode}
                m = torch.compile(model, **kw)
            step = _make_step(m, opt, ids)
            print(f"[step] {res} {mode}: first steps", flush=True)
            sync(device)
            t0 = time.perf_counter()
            loss = step()  # compiles forward and backward when compiled
            step()
            sync(device)
            compile_s[f"{res}/{mode}"] = time.perf_counter() - t0
            losses[f"{res}/{mode}"] = loss.item()
            calls[f"{res}/{mode}"] = step
    print(f"[step] timing {len(calls)} variants x {args.repeats} rounds", flush=True)
    times = interleaved(calls, repeats=args.repeats, warmup=1, device=device)
    rows = []
    for mode in modes:
        base = times[f"standard/{mode}"]
        for res in arms:
            t = times[f"{res}/{mode}"]
            ratio = paired_ratio(base, t)  # tokens/s of res / tokens/s of standard
            rows.append(
                {
                    "residual": res,
                    "mode": mode,
                    "time_ms": 1e3 * median(t),
                    "times_ms": [1e3 * x for x in t],
                    "tokens_per_s": batch * seq / median(t),
                    "tokens_per_s_vs_standard": ratio,
                    "overhead_vs_standard": 1 / ratio - 1,
                    "first_two_steps_s": compile_s[f"{res}/{mode}"],
                    "first_loss": losses[f"{res}/{mode}"],
                }
            )
    return {
        "model": model_kwargs(args.quick),
        "batch": batch,
        "seq": seq,
        "tokens_per_step": batch * seq,
        "device": str(device),
        "repeats": args.repeats,
        "compile_mode": args.compile_mode if "compiled" in modes else None,
        "optimizer": "AdamW(lr=1e-4, weight_decay=0.1), zero_grad(set_to_none=True)",
        "block_size_sublayers": 2,
        "rows": rows,
        "headline": {f"block/{r['mode']}": r["tokens_per_s_vs_standard"] for r in rows if r["residual"] == "block"}
        | {f"full/{r['mode']}": r["tokens_per_s_vs_standard"] for r in rows if r["residual"] == "full"},
    }


def to_markdown(res: dict) -> str:
    head = (
        f"Batch {res['batch']} x {res['seq']} tokens, {res['optimizer']}, device {res['device']}, median of "
        f"{res['repeats']} interleaved rounds; ratio = median over rounds of the paired tokens/s ratio "
        f"(compile mode: {res['compile_mode']})."
    )
    rows = [
        (
            r["residual"],
            r["mode"],
            r["time_ms"],
            r["tokens_per_s"],
            r["tokens_per_s_vs_standard"],
            100 * r["overhead_vs_standard"],
        )
        for r in res["rows"]
    ]
    return (
        head
        + "\n\n"
        + md_table(["residual", "mode", "step ms", "tokens/s", "tokens/s ÷ standard", "time overhead %"], rows)
    )


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("step")
    g.add_argument("--batch", type=int, default=8, help="sequences per step (quick: 2)")
    g.add_argument("--seq", type=int, default=256, help="tokens per sequence (quick: 128)")
    g.add_argument(
        "--compile-mode",
        default="default",
        choices=["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode for the compiled arm ('none' skips it; --quick always skips it)",
    )
    g.add_argument(
        "--arms", nargs="*", default=[], metavar="ARM",
        help="more arms beside standard/full/block, as attnres ablate takes them: a scheme or "
             "SCHEME:KEY=VALUE,... with scheme keys (e.g. block:attn_res_weights=sigmoid full:attn_res_window=2 hc)",
    )
