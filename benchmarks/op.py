"""One AttnRes read: ours vs the paper's Fig. 2 pseudocode, fla's naive reference and our naive reference.

Bandwidth is taken against the *minimum* traffic of the read (every source read once, the output
written once), so a perfect single-pass kernel would reach the machine's copy bandwidth:

- forward: read L sources + write 1 output = (L + 1) * tokens * D * 4 bytes;
- forward + backward: forward, then read dy and the L sources again and write L source grads
  = (3L + 2) * tokens * D * 4 bytes (per-token statistics and the [D] query/gain grads are negligible).

The copy reference is ``dst.copy_(src)`` moving the same number of bytes (src and dst each half of
them), timed in the same rounds; "of copy" = copy time / variant time, a paired median over rounds.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import interleaved, median, paired_ratio
from .fla_loader import DEFAULT_CACHE, load_fla_fused, load_fla_naive

FULL_SOURCES = (2, 5, 9, 17, 33)
FULL_DIMS = (256, 1000, 1024, 4096)
FULL_TOKENS = (2048, 8192)
QUICK_SHAPES = ((5, 256, 512), (9, 1000, 256))  # (L, D, tokens)
HEADLINE = (9, 1024, 8192)
EPS = 1e-6
# Peak bytes of the slowest variant (pseudocode fwd+bwd) as a multiple of the sources' bytes: the sources,
# their grads, the stack, the normalised keys, and the grads of both (measured: ~6-7x); used to skip shapes.
PEAK_FACTOR = 8


def pseudocode_read(w, sources, gain):
    """The paper's Fig. 2 pseudocode, in eager PyTorch (RMSNorm with gain, as nn.RMSNorm does it)."""
    V = torch.stack(sources)
    K = F.rms_norm(V, (V.shape[-1],), gain, EPS)
    logits = torch.einsum("d,l...d->l...", w, K)
    return torch.einsum("l...,l...d->...d", logits.softmax(0), V)


def variants(device: torch.device, fla_cache: Path, fla_download: bool) -> tuple[dict, dict]:
    """name -> callable(query, sources, gain), and name -> {available, reason, info}."""
    from attnres import attn_res, naive_attn_res
    from attnres.ops import cpu_kernel

    def ours_torch(q, s, g):  # the PyTorch implementation the fused kernel replaces (chosen at forward time)
        was = cpu_kernel.enabled()
        cpu_kernel.set_enabled(False)
        try:
            return attn_res(q, s, rms_weight=g, rms_eps=EPS)
        finally:
            cpu_kernel.set_enabled(was)

    fns = {
        "ours": lambda q, s, g: attn_res(q, s, rms_weight=g, rms_eps=EPS),
        "pseudocode": pseudocode_read,
    }
    meta = {
        "ours": {"available": True, "what": "attnres.attn_res as dispatched: on CPU fp32 the fused C++ kernel "
                 "(one pass per source row), on CUDA the Triton kernel; saves stats only, recomputes in backward"},
        "pseudocode": {"available": True, "what": "PAPER Fig. 2: stack, rms_norm(V)*g, einsum, softmax(0), einsum"},
    }
    if device.type == "cpu":
        def ours_fresh(q, s, g):  # the fused kernel with fresh output memory (its pool bypassed)
            with cpu_kernel.fresh_memory():
                return attn_res(q, s, rms_weight=g, rms_eps=EPS)

        fns["ours_fresh"] = ours_fresh
        meta["ours_fresh"] = {"available": True, "what": "ours with the kernel's output pool bypassed "
                              "(cpu_kernel.fresh_memory()): outputs and source grads in fresh memory, as before "
                              "the pool"}
        fns["ours_torch"] = ours_torch
        meta["ours_torch"] = {"available": True, "what": "attnres.attn_res with the fused kernel off "
                              "(cpu_kernel.set_enabled(False)): the PyTorch-ops custom autograd read "
                              "(no stack, recompute in backward)"}
    fla = load_fla_naive(fla_cache, download=fla_download)
    meta["fla_naive"] = {
        "available": fla.fn is not None,
        "reason": fla.reason,
        "info": fla.info,
        "what": "fla.ops.attnres.naive.naive_attnres, loaded by path",
    }
    if fla.fn is not None:
        naive = fla.fn
        fns["fla_naive"] = lambda q, s, g: naive(q, s, g, rms_eps=EPS)
    fns["our_naive"] = lambda q, s, g: naive_attn_res(q, s, rms_weight=g, rms_eps=EPS)
    meta["our_naive"] = {"available": True, "what": "attnres.naive_attn_res (the tests' reference)"}
    if device.type == "cuda":
        fused = load_fla_fused(fla_cache)
        meta["fla_fused"] = {
            "available": fused.fn is not None,
            "reason": fused.reason,
            "info": fused.info,
            "what": "fla.ops.attnres.fused_attnres (Triton)",
        }
        if fused.fn is not None:
            fused_fn = fused.fn
            fns["fla_fused"] = lambda q, s, g: fused_fn(q, s, g, rms_eps=EPS)
    return fns, meta


def traffic_bytes(L: int, D: int, tokens: int, mode: str) -> int:
    n = tokens * D * 4
    return (L + 1) * n if mode == "fwd" else (3 * L + 2) * n


def _calls(fns, mode, query, sources, gain, dy) -> tuple[dict, dict, dict]:
    """name -> zero-argument call of that variant for ``mode``, after one checked (warm-up) call each."""
    calls, diffs, status = {}, {}, {}
    if mode == "fwd":
        with torch.no_grad():
            ref = fns["ours"](query, sources, gain).float()
    else:
        sources = [s.detach().clone().requires_grad_(True) for s in sources]
        query = query.clone().requires_grad_(True)
        gain = gain.clone().requires_grad_(True)
        inputs = [*sources, query, gain]
    for name, fn in fns.items():
        if mode == "fwd":

            def call(fn=fn):
                with torch.no_grad():
                    return fn(query, sources, gain)
        else:

            def call(fn=fn):
                return torch.autograd.grad(fn(query, sources, gain), inputs, dy)

        try:
            out = call()
            if mode == "fwd":
                diffs[name] = (out.float() - ref).abs().max().item()
        except Exception as e:  # e.g. out of memory: report it, keep going
            status[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        calls[name] = call
    return calls, diffs, status


def _bench_mode(fns, mode, L, D, tokens, device, repeats, query, sources, gain) -> list[dict]:
    nbytes = traffic_bytes(L, D, tokens, mode)
    src = torch.randn(nbytes // 8, device=device)
    dst = torch.empty_like(src).copy_(src)  # touch the pages before timing
    dy = torch.randn(tokens, D, device=device)
    calls, diffs, status = _calls(fns, mode, query, sources, gain, dy)
    calls = {"copy": lambda: dst.copy_(src)} | calls
    times = interleaved(calls, repeats=repeats, warmup=0, device=device)  # the checked calls warmed up
    rows = []
    for name in ["copy", *fns]:
        row = {
            "L": L,
            "D": D,
            "tokens": tokens,
            "mode": mode,
            "variant": name,
            "min_traffic_bytes": nbytes,
            "status": status.get(name, "ok"),
        }
        if name in times:
            t = median(times[name])
            row |= {
                "time_ms": 1e3 * t,
                "times_ms": [1e3 * x for x in times[name]],
                "gbps": nbytes / t / 1e9,
                "frac_copy": paired_ratio(times["copy"], times[name]),
            }
            if "pseudocode" in times:
                row["speedup_vs_pseudocode"] = paired_ratio(times["pseudocode"], times[name])
            if name in diffs:
                row["max_abs_diff_vs_ours"] = diffs[name]
        rows.append(row)
    return rows


def _bench_shape(fns, L, D, tokens, device, repeats, seed) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    sources = [torch.randn(tokens, D, generator=g).to(device) for _ in range(L)]
    query = (torch.randn(D, generator=g) / math.sqrt(D)).to(device)
    gain = (1 + 0.1 * torch.randn(D, generator=g)).to(device)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        rows += _bench_mode(fns, mode, L, D, tokens, device, repeats, query, sources, gain)
    return rows


def shapes(args) -> list[tuple[int, int, int]]:
    if args.quick:
        return list(QUICK_SHAPES)
    grid = [(L, D, T) for T in args.tokens for D in args.dims for L in args.sources if L * D * T <= args.max_elems]
    return grid + ([HEADLINE] if HEADLINE not in grid else [])


def run(args, device: torch.device) -> dict:
    fns, meta = variants(device, Path(args.fla_cache), not args.no_fla_download)
    rows, skipped = [], []
    cap = args.max_gb * 1e9
    for L, D, T in shapes(args):
        need = PEAK_FACTOR * L * T * D * 4
        if need > cap:
            skipped.append(
                {"L": L, "D": D, "tokens": T, "reason": f"~{need / 1e9:.1f} GB peak > --max-gb {args.max_gb}"}
            )
            continue
        print(f"[op] L={L} D={D} tokens={T}", flush=True)
        rows += _bench_shape(fns, L, D, T, device, args.repeats, args.seed)
    return {
        "dtype": "float32",
        "device": str(device),
        "repeats": args.repeats,
        "traffic_model": {
            "fwd": "(L+1)*tokens*D*4 bytes: read L sources, write 1 output (run under torch.no_grad)",
            "fwd+bwd": "(3L+2)*tokens*D*4 bytes: fwd, then read dy + L sources, write L source grads "
            "(grads via torch.autograd.grad w.r.t. sources, query and gain)",
            "copy": "dst.copy_(src) moving the same bytes (src = dst = half); frac_copy = t_copy / t_variant",
        },
        "variants": meta,
        "rows": rows,
        "skipped": skipped,
        "headline": headline(rows),
    }


def headline(rows: list[dict]) -> dict:
    L, D, T = HEADLINE
    out = {"shape": {"L": L, "D": D, "tokens": T}}
    for r in rows:
        if (r["L"], r["D"], r["tokens"]) == HEADLINE and r["variant"] == "ours" and "time_ms" in r:
            out[r["mode"]] = {k: r[k] for k in ("time_ms", "gbps", "frac_copy", "speedup_vs_pseudocode")}
    return out


def to_markdown(res: dict) -> str:
    from .common import md_table

    names = [n for n, m in res["variants"].items() if m["available"]]
    parts = [
        f"Device {res['device']}, fp32, median of {res['repeats']} interleaved rounds. Traffic model: "
        f"fwd {res['traffic_model']['fwd']}; fwd+bwd {res['traffic_model']['fwd+bwd']}. "
        f"Copy: {res['traffic_model']['copy']}."
    ]
    for name, m in res["variants"].items():
        line = f"- `{name}`: {m['what']}"
        if not m["available"]:
            line += f" — **unavailable**: {m['reason']}"
        elif m.get("info", {}).get("archive"):
            line += f" (from {m['info']['archive']}, sha256 {m['info']['sha256'][:12]})"
        parts.append(line)
    by_key = {(r["L"], r["D"], r["tokens"], r["mode"], r["variant"]): r for r in res["rows"]}
    shapes_seen = sorted({(r["tokens"], r["D"], r["L"]) for r in res["rows"]})
    for mode in ("fwd", "fwd+bwd"):
        headers = ["L", "D", "tokens", "copy GB/s", "ours GB/s", "ours of copy", "ours x vs pseudocode"]
        headers += [f"{n} ms" for n in names]
        table = []
        for T, D, L in shapes_seen:

            def get(v, k, T=T, D=D, L=L, mode=mode):
                return by_key.get((L, D, T, mode, v), {}).get(k)

            row = [
                L,
                D,
                T,
                get("copy", "gbps"),
                get("ours", "gbps"),
                get("ours", "frac_copy"),
                get("ours", "speedup_vs_pseudocode"),
            ]
            row += [get(n, "time_ms") for n in names]
            table.append(row)
        parts.append(f"\n**{mode}**\n\n" + md_table(headers, table))
    if res["skipped"]:
        parts.append(
            "\nSkipped (memory): " + ", ".join(f"L={s['L']} D={s['D']} T={s['tokens']}" for s in res["skipped"])
        )
    return "\n".join(parts)


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("op")
    g.add_argument("--sources", type=int, nargs="+", default=list(FULL_SOURCES), help="source counts L")
    g.add_argument("--dims", type=int, nargs="+", default=list(FULL_DIMS), help="hidden sizes D")
    g.add_argument("--tokens", type=int, nargs="+", default=list(FULL_TOKENS), help="token counts")
    g.add_argument(
        "--max-elems",
        type=float,
        default=2**24,
        help="keep grid shapes with L*D*tokens <= this (default 2**24 = 64 MB of fp32 sources, so the full mode "
        "stays near 10 min on 2 cores); the headline shape L=9 D=1024 tokens=8192 is always run",
    )
    g.add_argument(
        "--max-gb",
        type=float,
        default=3.0,
        help=f"skip shapes whose estimated peak ({PEAK_FACTOR}x the sources' bytes) exceeds this",
    )
    g.add_argument("--fla-cache", default=str(DEFAULT_CACHE), help="where fla's sdist (and einops) are kept")
    g.add_argument(
        "--no-fla-download",
        action="store_true",
        help="use only what is in --fla-cache (fla's naive is marked unavailable otherwise)",
    )
