"""``python -m benchmarks {op,step,memory,decode,all,pipeline}``: run benchmarks, write OUT/<name>.json and .md."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import decode, memory, op, pipeline, step
from .common import machine_info, machine_md, resolve_device, write_atomic, write_json

SECTIONS = {"op": op, "step": step, "memory": memory, "decode": decode}
EXTRA = {"pipeline": pipeline}  # not in "all": it spawns 2 processes (gloo)
HELP = {
    "op": "one AttnRes read: ours vs paper pseudocode vs fla naive vs our naive; time, GB/s, fraction of copy",
    "step": "training step (fwd+bwd+AdamW) standard vs full vs block (two-phase on/off) at chosen shapes, "
    "fp32 and bf16 autocast, eager and torch.compile; time ratios to standard",
    "memory": "bytes of distinct storages saved for backward by one training forward",
    "decode": "greedy generate with KV cache: per-token latency and tokens/s, batch 1 and 8, fp32 and bf16",
    "all": "every benchmark above; writes OUT/results.json and OUT/results.md",
    "pipeline": "pipeline parallelism: tensors/bytes per hop naive vs cached (paper shapes, this run) and the "
    "step time of a 2-process pipeline with and without the cross-stage cache (not part of 'all')",
}


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--quick", action="store_true", help="CI smoke mode: tiny shapes, few repeats, no compile")
    g.add_argument("--out", default="benchmarks/out", help="output directory (default: benchmarks/out)")
    g.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (default 5; quick 2)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu' or 'cuda[:i]'")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="{op,step,memory,decode,all,pipeline}")
    adders = {
        "op": [op.add_args],
        "step": [step.add_args],
        "memory": [step.add_args],
        "decode": [decode.add_args],
        "all": [op.add_args, step.add_args, decode.add_args],
        "pipeline": [pipeline.add_args],
    }
    for name, fns in adders.items():
        sp = sub.add_parser(name, help=HELP[name], description=HELP[name])
        _common(sp)
        for fn in fns:
            fn(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(str(e)) from e
    sections = SECTIONS | EXTRA
    names = list(SECTIONS) if args.command == "all" else [args.command]
    for name in names:  # every section's options are checked before any runs (one-line errors)
        if hasattr(sections[name], "check"):
            sections[name].check(args)
    out = Path(args.out)
    results = {"machine": machine_info(device), "quick": args.quick, "sections": {}}
    md = [f"# attnres benchmarks{' (quick)' if args.quick else ''}", "", machine_md(results["machine"])]
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        sec = sections[name].run(args, device)
        sec["wall_s"] = time.perf_counter() - t0
        results["sections"][name] = sec
        md += ["", f"## {name}", "", sections[name].to_markdown(sec)]
        print(f"[{name}] done in {sec['wall_s']:.1f} s", flush=True)
    results["wall_s"] = time.perf_counter() - t_all
    stem = "results" if args.command == "all" else args.command
    write_json(out / f"{stem}.json", results)
    write_atomic(out / f"{stem}.md", "\n".join(md) + "\n")
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} ({results['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
