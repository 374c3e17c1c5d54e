"""Pipeline parallelism: what each hop carries, naive vs cached (the paper's shapes and the run here), and
the step time of a 2-process pipeline with and without the cross-stage cache.

The counts come from ``attnres.distributed.pipeline.layout`` (the same table the stages run on); the run
spawns 2 processes (gloo, one thread each) that build the pipeline over one model and time ``step()``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

from attnres.distributed.pipeline.layout import Layout, paper_cached, paper_naive, style_of

from .common import md_table, model_kwargs

PAPER_SHAPES = [(2, 2), (4, 2), (4, 4), (8, 4)]  # (P, V) of DISTRIBUTED.md §3.6; PAPER Fig. 3 is P=4, V=2
D_UNIT, ELEM_UNIT = 4096, 2  # bytes per token below: hidden size 4096 in bf16


# ----------------------------------------------------------------------------- counts

def _span(xs: list[int]) -> str:
    """A hop list, short: ``2,3,4`` up to 8 hops, else a leading arithmetic run and repeats
    (``2..8, 8 x24``; ``3..15 (+2), 15 x25``)."""
    if len(xs) <= 8:
        return ",".join(map(str, xs))
    step, i = xs[1] - xs[0], 2
    while step > 0 and i < len(xs) and xs[i] - xs[i - 1] == step:
        i += 1
    if step <= 0 or i < 3:
        i = 0
    parts = [f"{xs[0]}..{xs[i - 1]}" + (f" (+{step})" if step > 1 else "")] if i else []
    for v, group in itertools.groupby(xs[i:]):
        n = len(list(group))
        parts.append(f"{v} x{n}" if n > 1 else str(v))
    return ", ".join(parts)


def paper_rows() -> list[dict]:
    """P x V stages of N_p blocks each (S = 2 sublayers, N_p decoder layers per stage), loop placement."""
    rows = []
    for (P, V), Np in [(pv, n) for n in (1, 2) for pv in PAPER_SHAPES]:
        lay = {name: Layout.build(P * V * Np, P, V, 2, cache=c, keep_exit=k)
               for name, c, k in (("naive", False, True), ("paper", True, False), ("cached", True, True))}
        hops = {name: lay[name].hop_tensors() for name in lay}
        rows.append({"P": P, "V": V, "Np": Np, "hops": hops,
                     "sum": {n: sum(h) for n, h in hops.items()}, "peak": {n: max(h) for n, h in hops.items()},
                     "eq7": paper_naive(P, V, Np), "eq8": paper_cached(P, V, Np)})
    return rows


def run_layouts(cfg: dict) -> list[dict]:
    """The measured run's hops for each residual arm: tensors and bytes, naive vs cached."""
    rows = []
    mb_tokens = cfg["batch"] // cfg["microbatches"] * cfg["seq"]
    for residual in ("block", "full", "standard"):
        for cache in (False, True) if residual != "standard" else (True,):
            lay = _layout(cfg, residual, cache)
            hops = lay.hop_tensors()
            bytes_ = lay.hop_bytes(mb_tokens, cfg["model"]["hidden_size"], 4)
            rows.append({"residual": residual, "cache": cache, "hops": hops, "local": [h.local for h in lay.hops()],
                         "bytes_per_microbatch": bytes_, "sum_bytes_per_step": sum(bytes_) * cfg["microbatches"],
                         "peak_bytes": max(bytes_)})
    return rows


# ----------------------------------------------------------------------------- the measured run

ARMS = [("block", True), ("block", False), ("full", True), ("full", False), ("standard", True)]  # (residual, cache)


def _arm(residual: str, cache: bool) -> str:
    return residual if residual == "standard" else f"{residual}/{'cache' if cache else 'naive'}"


def _pipeline(cfg: dict, residual: str, cache: bool):
    from attnres import AttnResConfig, AttnResForCausalLM
    from attnres.distributed.pipeline import build_pipeline
    from attnres.distributed.plan import ParallelPlan

    kw = dict(cfg["model"]) | ({"attn_res_block_size": 2} if residual == "block" else {})
    torch.manual_seed(cfg["seed"])
    model = AttnResForCausalLM(AttnResConfig(residual=residual, use_cache=False, **kw))
    plan = ParallelPlan(2, pipeline_stages=2, pipeline_virtual=cfg["virtual"], pipeline_schedule=cfg["schedule"],
                        pipeline_microbatches=cfg["microbatches"], pipeline_cache=cache)
    return model, build_pipeline(model, plan, batch_size=cfg["batch"], seq_len=cfg["seq"])


def _time_arms(rank: int, cfg: dict, ids: torch.Tensor) -> dict[str, list[float]]:
    import torch.distributed as dist

    pipes = {_arm(r, c): _pipeline(cfg, r, c)[1] for r, c in ARMS}
    times = {name: [] for name in pipes}
    names = list(pipes)
    for rnd in range(-1, cfg["repeats"]):  # round -1 warms up
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            dist.barrier()
            t0 = time.perf_counter()
            pipes[name].step(ids, ids)
            dist.barrier()
            if rnd >= 0:
                times[name].append(time.perf_counter() - t0)
    return times


def _time_one_process(rank: int, cfg: dict, ids: torch.Tensor) -> list[float]:
    """The same model and batch in one process (rank 0; rank 1 waits), forward + backward."""
    import torch.distributed as dist

    out = []
    if rank == 0:
        from attnres.distributed.pipeline import next_token_loss

        model = _one_process_model(cfg)
        for rnd in range(-1, cfg["repeats"]):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            next_token_loss(model(input_ids=ids).logits, ids).backward()
            if rnd >= 0:
                out.append(time.perf_counter() - t0)
    dist.barrier()
    return out


def _one_process_model(cfg: dict):
    from attnres import AttnResConfig, AttnResForCausalLM

    torch.manual_seed(cfg["seed"])
    return AttnResForCausalLM(AttnResConfig(residual="block", attn_res_block_size=2, use_cache=False, **cfg["model"]))


def _layout(cfg: dict, residual: str, cache: bool) -> Layout:
    S = {"block": 2, "full": 1, "standard": None}[residual]
    return Layout.build(cfg["model"]["num_hidden_layers"], 2, cfg["virtual"], S, style=style_of(cfg["schedule"]),
                        cache=cache)


def _transfer(rank: int, lay: Layout, shape: tuple[int, ...], microbatches: int) -> None:
    """One step's hop payloads between the two ranks, forward then backward, with blocking send/recv."""
    import torch.distributed as dist

    hops = [h for h in lay.hops() if not h.local]
    order = [(lay.ranks[h.k], lay.ranks[h.k + 1], h.tensors) for h in hops]
    order += [(b, a, n) for a, b, n in reversed(order)]
    buf = torch.zeros(shape)
    for src, dst, n in order:
        for _ in range(n * microbatches):
            if rank == src:
                dist.send(buf, dst)
            elif rank == dst:
                dist.recv(buf, src)


def _time_transfers(rank: int, cfg: dict) -> dict[str, list[float]]:
    """The communication alone: each arm's per-step hop payloads sent and received, interleaved rounds."""
    import torch.distributed as dist

    shape = (cfg["batch"] // cfg["microbatches"], cfg["seq"], cfg["model"]["hidden_size"])
    arms = {_arm(r, c): _layout(cfg, r, c) for r, c in ARMS}
    times = {name: [] for name in arms}
    for rnd in range(-1, cfg["repeats"]):
        for name, lay in arms.items():
            dist.barrier()
            t0 = time.perf_counter()
            _transfer(rank, lay, shape, cfg["microbatches"])
            dist.barrier()
            if rnd >= 0:
                times[name].append(time.perf_counter() - t0)
    return times


def _worker(rank: int, init: str, out: str, cfg: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=600))
    try:
        ids = torch.randint(0, cfg["model"]["vocab_size"], (cfg["batch"], cfg["seq"]),
                            generator=torch.Generator().manual_seed(cfg["seed"]))
        res = {"one_process": _time_one_process(rank, cfg, ids), "pipeline": _time_arms(rank, cfg, ids),
               "transfer": _time_transfers(rank, cfg)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def measure(cfg: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(f"file://{tmp}/store", tmp, cfg), nprocs=2, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    # a round's step time is the slower rank's (a barrier before and after every step)
    steps = {name: [max(a, b) for a, b in zip(ranks[0]["pipeline"][name], ranks[1]["pipeline"][name], strict=True)]
             for name in ranks[0]["pipeline"]}
    transfer = {name: [max(a, b) for a, b in zip(ranks[0]["transfer"][name], ranks[1]["transfer"][name], strict=True)]
                for name in ranks[0]["transfer"]}
    return {"one_process_s": ranks[0]["one_process"], "steps_s": steps, "transfer_s": transfer}


# ----------------------------------------------------------------------------- section interface

def run(args, device: torch.device) -> dict:
    cfg = {"model": model_kwargs(args.quick), "schedule": args.pp_schedule, "virtual": args.pp_virtual,
           "microbatches": args.pp_microbatches, "batch": 4 if args.quick else args.pp_batch,
           "seq": 32 if args.quick else args.pp_seq, "repeats": args.repeats, "seed": args.seed}
    print(f"[pipeline] 2 processes, {cfg['schedule']} P=2 V={cfg['virtual']}, {len(ARMS)} arms x "
          f"{cfg['repeats']} rounds", flush=True)
    timed = measure(cfg)
    steps = timed["steps_s"] | {"block/1 process": timed["one_process_s"]}
    rows = [{"arm": name, "step_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
             "times_ms": [1e3 * x for x in t], "tokens_per_s": cfg["batch"] * cfg["seq"] / statistics.median(t),
             "vs_naive": _vs_naive(name, steps),
             "transfer_ms": 1e3 * statistics.median(timed["transfer_s"][name]) if name in timed["transfer_s"] else None}
            for name, t in steps.items()]
    return {"config": cfg, "device": "cpu (gloo; --device is ignored)", "paper": paper_rows(),
            "layouts": run_layouts(cfg), "rows": rows}


def _vs_naive(name: str, steps: dict) -> float | None:
    """Cache ÷ naive step time: the median over rounds of the ratio within a round (both timed in it)."""
    naive = name.replace("/cache", "/naive")
    if not name.endswith("/cache") or naive not in steps:
        return None
    return statistics.median(a / b for a, b in zip(steps[name], steps[naive], strict=True))


def _paper_md(res: dict) -> str:
    rows = []
    kib = D_UNIT * ELEM_UNIT / 1024
    for r in res["paper"]:
        s, p = r["sum"], r["peak"]
        rows.append((r["P"], r["V"], r["Np"], _span(r["hops"]["naive"]), _span(r["hops"]["paper"]),
                     _span(r["hops"]["cached"]), f"{s['naive']} / {s['paper']} / {s['cached']}",
                     f"{r['eq7']:g} + {r['P'] * r['V'] - 1} / {r['eq8']:g} + {r['P'] - 1}",
                     f"{p['naive']} / {p['paper']} / {p['cached']}", s["naive"] * kib, s["cached"] * kib))
    head = ["P", "V", "N_p", "naive per hop", "cached per hop (paper)", "cached per hop (kept exit)",
            "Σ naive / paper / kept", "Eq.7 + (C-1) / Eq.8 + (P-1)", "peak naive / paper / kept",
            "Σ naive KiB/token", "Σ kept KiB/token"]
    return md_table(head, rows)


def _run_md(res: dict) -> str:
    cfg = res["config"]
    def kib(r: dict) -> str:
        return ",".join("local" if loc else f"{b / 2**10:.0f}"
                        for b, loc in zip(r["bytes_per_microbatch"], r["local"], strict=True))

    rows = [(_arm(r["residual"], r["cache"]), _span(r["hops"]), kib(r), r["sum_bytes_per_step"] / 2**20,
             r["peak_bytes"] / 2**10) for r in res["layouts"]]
    table = md_table(["residual/transport", "tensors per hop", "KiB per hop per microbatch",
                      "Σ MiB sent per step (fwd; bwd the same)", "peak KiB per hop"], rows)
    timed = md_table(["arm", "step ms (median)", "step ms (min)", "tokens/s", "cache ÷ naive time (paired)",
                      "hop payloads alone, ms per step"],
                     [(r["arm"], r["step_ms"], r["min_ms"], r["tokens_per_s"], r["vs_naive"], r["transfer_ms"])
                      for r in res["rows"]])
    return (f"Run: {cfg['schedule']}, P=2, V={cfg['virtual']}, {cfg['microbatches']} microbatches, batch "
            f"{cfg['batch']} x {cfg['seq']}, model {cfg['model']}, fp32, block S=2; 2 processes x 1 thread, gloo; "
            f"median of {cfg['repeats']} interleaved rounds (forward + backward, no optimizer; the 1-process arm runs "
            f"first, alone, rank 1 waiting).\n\n{table}\n\n{timed}")


def to_markdown(res: dict) -> str:
    return ("Tensors are `[rows, T, d]` (one d-vector per token); KiB/token at d = 4096, bf16. 'paper' does not "
            "keep a stage's own exit block (Eq. 8's accounting), 'kept' (the library's default) does.\n\n"
            + _paper_md(res) + "\n\n" + _run_md(res))


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline")
    g.add_argument("--pp-schedule", default="Interleaved1F1B", help="the measured run's schedule")
    g.add_argument("--pp-virtual", type=int, default=2, help="stages per rank (V) of the measured run")
    g.add_argument("--pp-microbatches", type=int, default=4)
    g.add_argument("--pp-batch", type=int, default=8, help="sequences per step (quick: 4)")
    g.add_argument("--pp-seq", type=int, default=256, help="tokens per sequence (quick: 32)")
