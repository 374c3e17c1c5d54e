"""Training step (forward, backward, AdamW step) of standard vs Full vs Block AttnRes (two-phase on and off)
at the shapes users train, fp32 and bf16 autocast, eager and ``torch.compile``; plus any ``--arms`` (other
schemes, Table 4 options: what they cost against the same standard step).

Every arm x dtype x mode of one shape is timed in the same interleaved rounds; ratios are medians over rounds
of the paired time ratio to standard at the same dtype and mode, with their min-max spread."""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

import torch

from .common import (
    DTYPES,
    MODES,
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
    shape_model_kwargs,
    spread,
    sync,
    verdict,
    write_json,
)

# The arms every run has: name -> (scheme, config overrides). Acceptance (issue 13): block <= 1.05x, full <= 1.10x.
CORE_ARMS = {
    "standard": ("standard", {}),
    "full": ("full", {}),
    "block": ("block", {}),
    "block-no-two-phase": ("block", {"attn_res_two_phase": False}),
}
# --traced-arm: the same models, compiled with the read traced for inductor (cpu_kernel.set_compiled(False))
# instead of calling the fused kernel's attnres:: ops; compiled mode only.
TRACED_ARMS = {"full-traced": ("full", {}), "block-traced": ("block", {})}
# --uncarried-arm: the same models with autograd summing each source's per-read gradient terms
# (cpu_kernel.set_carry(False)) instead of the reads carrying them into one buffer per source; every mode.
UNCARRIED_ARMS = {"full-uncarried": ("full", {}), "block-uncarried": ("block", {})}
VARIANT_OF = {**{k: v[0] for k, v in TRACED_ARMS.items()}, **{k: v[0] for k, v in UNCARRIED_ARMS.items()}}
# --aa-arm: a second standard model, built the same way: its ratio to standard is the noise floor of a run
AA_ARM = {"standard-aa": ("standard", {})}
TARGETS = {"block": 1.05, "full": 1.10}
REFERENCE_SHAPE = "256x8x256"
# --shapes issue13: the reference and the shapes issue 13 asks for (d 768 x 12 and d 1024 x 16, sequences 512-2048)
ISSUE13_SHAPES = "256x8x256x8,768x12x512x1,768x12x2048x1,1024x16x1024x1,1024x16x2048x1"


def _autocast(dtype: str, device: torch.device):
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def _make_step(model, opt, ids, dtype: str, device: torch.device):
    def step():
        with _autocast(dtype, device):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def resolve(args) -> dict:
    """Parse and check the step options once (one-line ``SystemExit`` on a bad one), before anything runs."""
    if getattr(args, "_step_plan", None) is not None:
        return args._step_plan
    from attnres.train.ablate import parse_arm
    from attnres.train.config import ConfigError

    if args.batch < 1 or args.seq < 1:
        raise SystemExit(f"--batch and --seq must be >= 1, got {args.batch} and {args.seq}")
    if args.blocks < 1:
        raise SystemExit(f"--blocks must be >= 1, got {args.blocks}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    if args.shapes is not None:
        shapes = parse_shapes("--shapes", ISSUE13_SHAPES if args.shapes == "issue13" else args.shapes, args.batch)
    elif args.quick:
        shapes = [dict(hidden=64, layers=4, seq=128, batch=2)]
    else:
        shapes = parse_shapes("--shapes", f"{REFERENCE_SHAPE}x{args.batch}" if args.seq == 256 else
                              f"256x8x{args.seq}x{args.batch}", args.batch)
    dtypes = parse_choices("--dtypes", args.dtypes, tuple(DTYPES))
    if args.modes is not None:
        modes = parse_choices("--modes", args.modes, MODES)
    else:
        modes = ["eager"] if args.quick else list(MODES)
    if args.compile_mode == "none":
        modes = [m for m in modes if m != "compiled"]
        if not modes:
            raise SystemExit("--compile-mode none leaves no mode: --modes must then include eager")
    args._inductor_options = _inductor_options(args, modes)
    arms = {k: v for k, v in CORE_ARMS.items() if not (args.no_two_phase_arm and k == "block-no-two-phase")}
    for text in args.arms:
        if text in arms:
            continue
        try:
            arm = parse_arm(text)
        except ConfigError as e:
            raise SystemExit(f"--arms: {e}") from None
        arms[text] = (arm.scheme, dict(arm.overrides))
    if args.aa_arm:
        arms |= AA_ARM
    if args.traced_arm:
        if "compiled" not in modes:
            raise SystemExit("--traced-arm needs the compiled mode (--modes compiled or eager,compiled)")
        arms |= TRACED_ARMS
    if args.uncarried_arm:
        arms |= UNCARRIED_ARMS
    import inspect

    from attnres import AttnResConfig
    from attnres.train.config import SCHEME_KEYS

    model_keys = set(inspect.signature(AttnResConfig.__init__).parameters) | set(SCHEME_KEYS)
    for text, (scheme, overrides) in arms.items():  # a key the model does not take fails here, in one line
        other = sorted(set(overrides) - model_keys)
        if other:
            raise SystemExit(f"--arms {text!r}: {', '.join(other)} is not a model key (the step benchmark's "
                             "optimizer is fixed); give scheme keys or attn_res_* block keys")
        try:
            AttnResConfig(residual=scheme, **shape_model_kwargs(64, 2, True) | overrides)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--arms {text!r}: {str(e).splitlines()[0]}") from None
    plan = dict(shapes=shapes, dtypes=dtypes, modes=modes, arms=arms)
    args._step_plan = plan
    return plan


def check(args) -> None:
    resolve(args)


def _inductor_options(args, modes: list[str]) -> dict:
    """``--inductor-option KEY=VALUE`` as torch.compile's ``options`` (values as Python literals), checked
    against ``torch._inductor.config``: a key it lacks or a value of another type is a one-line error."""
    if not args.inductor_option:
        return {}
    if "compiled" not in modes or args.compile_backend != "inductor" or args.compile_mode != "default":
        raise SystemExit("--inductor-option needs the compiled mode with --compile-backend inductor and "
                         "--compile-mode default (torch.compile takes options or a mode, not both)")
    import ast
    import functools

    import torch._inductor.config as inductor_config

    options = {}
    for text in args.inductor_option:
        key, eq, raw = text.partition("=")
        if not eq or not key:
            raise SystemExit(f"--inductor-option {text!r}: expected KEY=VALUE, e.g. reorder_for_peak_memory=False")
        if key not in inductor_config._config:
            raise SystemExit(f"--inductor-option {text!r}: {key!r} is not an option of torch._inductor.config "
                             "(e.g. reorder_for_peak_memory)")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        current = functools.reduce(getattr, key.split("."), inductor_config)
        if current is not None and type(value) is not type(current):
            raise SystemExit(f"--inductor-option {text!r}: {key} takes a {type(current).__name__} "
                             f"(now {current!r}), got {raw!r}")
        options[key] = value
    return options


def _compile(model, args):
    kw = {"backend": args.compile_backend}
    if args.compile_mode not in ("default", "none"):
        kw["mode"] = args.compile_mode
    if args._inductor_options:
        kw["options"] = dict(args._inductor_options)
    return torch.compile(model, **kw)


def _flagged(step, setter):
    """``step`` run with ``setter(False)`` (a guarded flag: a compiled arm gets graphs of its own), then True."""
    def run():
        setter(False)
        try:
            return step()
        finally:
            setter(True)

    return run


def _run_shape(args, device, shape: dict, plan: dict) -> dict:
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from attnres.ops import cpu_kernel

    label = shape_label(shape)
    batch, seq = shape["batch"], shape["seq"]
    dynamo.reset()  # a fresh cache per shape: models of earlier shapes never count against the recompile limit
    counters.clear()
    vocab = 1024 if args.quick else 8192
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(args.seed)).to(device)
    calls, first_s, losses, configs, graphs = {}, {}, {}, {}, {}
    for name, (scheme, overrides) in plan["arms"].items():
        model, cfg = build_arm_model(scheme, overrides, shape, args.seed, device, args.quick, args.blocks)
        model.train()
        configs[name] = cfg | {"parameters": sum(p.numel() for p in model.parameters())}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        for mode in ["compiled"] if name in TRACED_ARMS else plan["modes"]:
            m = _compile(model, args) if mode == "compiled" else model
            for dtype in plan["dtypes"]:
                key = f"{name}/{dtype}/{mode}"
                step = _make_step(m, opt, ids, dtype, device)
                if name in TRACED_ARMS:  # torch.compile traces the PyTorch read
                    step = _flagged(step, cpu_kernel.set_compiled)
                elif name in UNCARRIED_ARMS:
                    step = _flagged(step, cpu_kernel.set_carry)
                print(f"[step] {label} {key}: first two steps", flush=True)
                before = counters["stats"]["unique_graphs"]
                sync(device)
                t0 = time.perf_counter()
                loss = step()  # compiles forward and backward when compiled
                step()
                sync(device)
                first_s[key] = time.perf_counter() - t0
                graphs[key] = counters["stats"]["unique_graphs"] - before
                losses[key] = loss.item()
                calls[key] = step
                print(f"[step] {label} {key}: {first_s[key]:.1f} s, loss {losses[key]:.3f}", flush=True)
    print(f"[step] {label}: timing {len(calls)} variants x {args.repeats} rounds (+{args.warmup} warm-up)", flush=True)

    def progress(r, ts):
        print(f"[step] {label} round {r + 1}/{args.repeats}: "
              + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in ts.items()), flush=True)

    graphs_before = counters["stats"]["unique_graphs"]
    # the arms of one dtype x mode next to each other in a round, so each ratio pairs neighbouring steps
    times = interleaved(calls, repeats=args.repeats, warmup=args.warmup, device=device, progress=progress,
                        group=lambda key: tuple(key.split("/")[1:]))
    graphs_timed = counters["stats"]["unique_graphs"] - graphs_before
    rows = []
    for dtype in plan["dtypes"]:
        for mode in plan["modes"]:
            base = times[f"standard/{dtype}/{mode}"]
            for name in plan["arms"]:
                key = f"{name}/{dtype}/{mode}"
                if key not in times:  # a traced arm in eager mode
                    continue
                t = times[key]
                ratios = [a / b for a, b in zip(t, base, strict=True)]  # time of the arm / time of standard
                lo, hi = spread(ratios)
                ci = median_interval(ratios)
                tr = median(ratios)
                rows.append(
                    {
                        "shape": label,
                        "hidden": shape["hidden"],
                        "layers": shape["layers"],
                        "batch": batch,
                        "seq": seq,
                        "residual": name,
                        "dtype": dtype,
                        "mode": mode,
                        "time_ms": 1e3 * median(t),
                        "times_ms": [1e3 * x for x in t],
                        "tokens_per_s": batch * seq / median(t),
                        "time_vs_standard": tr,
                        "time_vs_standard_min": lo,
                        "time_vs_standard_max": hi,
                        "time_vs_standard_ci95": list(ci),
                        "tokens_per_s_vs_standard": median([b / a for a, b in zip(t, base, strict=True)]),
                        "overhead_vs_standard": tr - 1,
                        "first_two_steps_s": first_s[key],
                        "graphs_compiled_in_first_steps": graphs[key] if mode == "compiled" else None,
                        "first_loss": losses[key],
                    }
                )
    return {
        "shape": label,
        "batch": batch,
        "seq": seq,
        "tokens_per_step": batch * seq,
        "arms": configs,
        "graphs_compiled_while_timing": graphs_timed,
        "rows": rows,
    }


def run(args, device: torch.device) -> dict:
    plan = resolve(args)
    if "compiled" in plan["modes"]:
        import torch._dynamo as dynamo

        # every arm x dtype of a shape is a cache entry of the same forward's code: keep them all compiled
        limit = 8 * len(plan["arms"]) * len(plan["dtypes"])
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, limit)
    shapes = []
    for i, shape in enumerate(plan["shapes"]):
        print(f"[step] shape {i + 1}/{len(plan['shapes'])}: {shape_label(shape)}", flush=True)
        t0 = time.perf_counter()
        res = _run_shape(args, device, shape, plan)
        res["wall_s"] = time.perf_counter() - t0
        shapes.append(res)
        # a long run keeps what it measured if a later shape fails (out of memory) or is stopped
        write_json(Path(args.out) / "step.partial.json", {"command": machine_info(device)["command"], "shapes": shapes})
    rows = [r for s in shapes for r in s["rows"]]
    headline = {
        f"{r['shape']}/{r['dtype']}/{r['mode']}/{r['residual']}": r["time_vs_standard"]
        for r in rows
        if r["residual"] != "standard"
    }
    return {
        "device": str(device),
        "repeats": args.repeats,
        "warmup_rounds": args.warmup,
        "dtypes": {d: ("fp32 weights, torch.autocast(bfloat16) around forward + loss" if DTYPES[d] else
                       "fp32 weights and math") for d in plan["dtypes"]},
        "modes": plan["modes"],
        "compile": {"backend": args.compile_backend, "mode": args.compile_mode}
        | ({"inductor_options": args._inductor_options} if args._inductor_options else {})
        if "compiled" in plan["modes"] else None,
        "optimizer": "AdamW(lr=1e-4, weight_decay=0.1), zero_grad(set_to_none=True)",
        "num_blocks": args.blocks,
        "targets_time_vs_standard": TARGETS,
        "shapes": [{k: v for k, v in s.items() if k != "rows"} for s in shapes],
        "rows": rows,
        "headline": headline,
    }


def _verdict(name: str, row: dict) -> str:
    target = TARGETS.get(VARIANT_OF.get(name, name))  # a traced or uncarried arm: its scheme's
    return verdict(row["time_vs_standard"], target, row.get("time_vs_standard_ci95") or (math.nan, math.nan))


def to_markdown(res: dict) -> str:
    comp = res["compile"]
    head = (
        f"{res['optimizer']}, device {res['device']}, median of {res['repeats']} interleaved rounds "
        "(every arm x dtype x mode of a shape in each round, the arms of a dtype x mode next to each other, in "
        "Williams' balanced orders: each arm after each other equally often; "
        f"{res['warmup_rounds']} warm-up round(s) "
        "after the first two steps, which compile when compiled). 'time ÷ standard' = median over rounds of the "
        "arm's step time / standard's in the same round, at the same dtype and mode; [min–max] over rounds; "
        "'ci' a distribution-free 95 % interval of that median (from 6 rounds); 'unresolved': the target lies in "
        "it. "
        f"bf16 = fp32 weights under torch.autocast(bfloat16). Compiled = torch.compile(model)"
        + (f" (backend {comp['backend']}, mode {comp['mode']}"
           + "".join(f", {k}={v!r}" for k, v in comp.get("inductor_options", {}).items()) + ")" if comp else "")
        + f". Block: N = {res['num_blocks']} blocks; 'block-no-two-phase' = Block with attn_res_two_phase=False; "
        "'*-traced' = compiled with the read traced for inductor instead of the fused kernel's ops. "
        "'*-uncarried' = autograd sums each source's per-read gradient terms (cpu_kernel.set_carry(False)) instead "
        "of the fused reads building each source's gradient in one buffer. "
        f"Targets: block ≤ {TARGETS['block']}, full ≤ {TARGETS['full']}."
    )
    arms = list(dict.fromkeys(r["residual"] for r in res["rows"] if r["residual"] != "standard"))
    summary = []
    for s in res["shapes"]:
        for dtype in res["dtypes"]:
            for mode in res["modes"]:
                cells = [s["shape"], dtype, mode]
                for a in arms:
                    r = next((r for r in res["rows"] if r["shape"] == s["shape"] and r["dtype"] == dtype
                              and r["mode"] == mode and r["residual"] == a), None)
                    if r is None:
                        cells.append("—")
                        continue
                    v = _verdict(a, r)
                    cells.append(f"{r['time_vs_standard']:.3f} [{r['time_vs_standard_min']:.3f}–"
                                 f"{r['time_vs_standard_max']:.3f}]" + interval_text(r.get("time_vs_standard_ci95"))
                                 + (f" {v}" if v else ""))
                summary.append(cells)
    detail = [
        (
            r["shape"],
            r["dtype"],
            r["mode"],
            r["residual"],
            r["time_ms"],
            r["tokens_per_s"],
            r["time_vs_standard"],
            100 * r["overhead_vs_standard"],
            r["first_two_steps_s"],
        )
        for r in res["rows"]
    ]
    arm_rows = [
        (s["shape"], name, cfg["residual"], cfg.get("block_size"), cfg.get("attn_res_two_phase", True),
         cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"],
         cfg["parameters"])
        for s in res["shapes"]
        for name, cfg in s["arms"].items()
    ]
    timing = "; ".join(f"{s['shape']}: {s['wall_s']:.0f} s, graphs compiled while timing "
                       f"{s['graphs_compiled_while_timing']}" for s in res["shapes"])
    return (
        head
        + "\n\n**Time ÷ standard (median [min–max] ci 95 % interval of the median)**\n\n"
        + md_table(["shape (d x layers, batch x seq)", "dtype", "mode", *arms], summary)
        + "\n\n"
        + md_table(["shape", "dtype", "mode", "residual", "step ms", "tokens/s", "time ÷ standard",
                    "time overhead %", "first two steps s"], detail)
        + "\n\n**Arms**\n\n"
        + md_table(["shape", "arm", "residual", "block size S (sublayers)", "two-phase", "heads", "KV heads",
                    "MLP", "vocab", "parameters"], arm_rows)
        + f"\n\nWall time per shape: {timing}."
    )


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("step")
    g.add_argument("--shapes", default=None, metavar="HxLxT[xB],...",
                   help="model and batch shapes, hidden x layers x seq[x batch], comma-separated, e.g. "
                        "256x8x256x8,768x12x512x2,1024x16x1024x1 (default: the reference 256x8xSEQxBATCH; quick: "
                        "64x4x128x2); 'issue13' = " + ISSUE13_SHAPES
                        + ". Heads: hidden/64 (32 per head up to 256), KV heads half, MLP 2.75x, vocab 8192")
    g.add_argument("--batch", type=int, default=8, help="sequences per step for shapes without xBATCH (quick: 2)")
    g.add_argument("--seq", type=int, default=256, help="tokens per sequence of the default shape (quick: 128)")
    g.add_argument("--dtypes", default="fp32,bf16",
                   help="comma-separated: fp32 and/or bf16 (fp32 weights under bf16 autocast); default fp32,bf16")
    g.add_argument("--modes", default=None,
                   help="comma-separated: eager and/or compiled (torch.compile(model)); default both "
                        "(quick: eager)")
    g.add_argument("--blocks", type=int, default=8, help="Block AttnRes: N blocks (S = ceil(2 layers / N)); default 8")
    g.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds of every variant after its first two steps (default 1)")
    g.add_argument("--no-two-phase-arm", action="store_true",
                   help="leave out the block-no-two-phase arm (Block with attn_res_two_phase=False)")
    g.add_argument("--aa-arm", action="store_true",
                   help="add standard-aa, a second standard model built the same way and timed in the same rounds: "
                        "its ratio to standard (ideally 1) shows how far this machine's noise moves a ratio")
    g.add_argument("--traced-arm", action="store_true",
                   help="add full-traced and block-traced arms (compiled only): on CPU the read traced for inductor "
                        "(cpu_kernel.set_compiled(False)) instead of the fused kernel's attnres:: ops (on CUDA "
                        "the reads trace by default, so these equal full and block there)")
    g.add_argument("--uncarried-arm", action="store_true",
                   help="add full-uncarried and block-uncarried arms: autograd sums each source's gradient terms "
                        "(cpu_kernel.set_carry(False)) instead of the fused reads carrying them into one buffer")
    g.add_argument(
        "--compile-mode",
        default="default",
        choices=["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode for the compiled arm ('none' drops the compiled mode)",
    )
    g.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; aot_eager for a fast smoke test)")
    g.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of torch._inductor.config for every compiled arm, passed as "
                        "torch.compile(model, options={KEY: VALUE}) (VALUE a Python literal; repeatable), e.g. "
                        "reorder_for_peak_memory=False; needs --compile-backend inductor and --compile-mode default")
    g.add_argument(
        "--arms", nargs="*", default=[], metavar="ARM",
        help="more arms beside standard/full/block/block-no-two-phase, as attnres ablate takes them: a scheme or "
             "SCHEME:KEY=VALUE,... with scheme keys (e.g. block:attn_res_weights=sigmoid full:attn_res_window=2 hc)",
    )
