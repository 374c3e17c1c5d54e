"""Bytes saved for backward by one training forward: distinct storages, via saved_tensors_hooks."""

from __future__ import annotations

import argparse

import torch

from attnres.models import enable_activation_checkpointing

from .common import RESIDUALS, build_model, md_table, model_kwargs


def saved_storages(fn) -> dict[int, int]:
    """data_ptr -> nbytes of every distinct storage autograd saves while ``fn()`` runs (the graph is freed)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return seen


def _measure(model, ids, scope: str) -> dict:
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    if scope == "model+loss":
        seen = saved_storages(lambda: model(input_ids=ids, labels=ids, use_cache=False).loss)
    else:  # the decoder stack only: embedding, layers, residual reads, final norm (no LM head, no loss)
        seen = saved_storages(lambda: model.model(input_ids=ids, use_cache=False).last_hidden_state)
    total = sum(seen.values())
    params = sum(n for ptr, n in seen.items() if ptr in param_ptrs)
    return {
        "scope": scope,
        "saved_bytes_total": total,
        "saved_bytes_params": params,
        "saved_bytes_activations": total - params,
        "distinct_storages": len(seen),
    }


def run(args, device: torch.device) -> dict:
    batch, seq = (2, 128) if args.quick else (args.batch, args.seq)
    ids = torch.randint(
        0, model_kwargs(args.quick)["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(args.seed)
    ).to(device)
    rows = []
    arms = list(RESIDUALS) + [a for a in getattr(args, "arms", []) if a not in RESIDUALS]
    for checkpointing in (False, True):
        for res in arms:
            model = build_model(res, args.seed, device, args.quick).train()
            if checkpointing:  # every decoder layer recomputed in backward, AttnRes reads included
                enable_activation_checkpointing(model)
            param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            for scope in ("model+loss", "decoder"):
                row = {"residual": res, "checkpointing": checkpointing, "param_bytes": param_bytes}
                rows.append(row | _measure(model, ids, scope))
    for r in rows:  # against standard *without* checkpointing
        base = next(b for b in rows if b["residual"] == "standard" and not b["checkpointing"]
                    and b["scope"] == r["scope"])
        r["total_vs_standard"] = r["saved_bytes_total"] / base["saved_bytes_total"]
        r["activations_vs_standard"] = r["saved_bytes_activations"] / base["saved_bytes_activations"]
    return {
        "model": model_kwargs(args.quick),
        "batch": batch,
        "seq": seq,
        "device": str(device),
        "rows": rows,
        "headline": {
            f"{r['residual']}{'+ckpt' if r['checkpointing'] else ''}/{r['scope']}": r["activations_vs_standard"]
            for r in rows if r["residual"] != "standard" or r["checkpointing"]
        },
    }


def to_markdown(res: dict) -> str:
    mib = 2**20
    rows = [
        (
            r["residual"],
            "on" if r["checkpointing"] else "off",
            r["scope"],
            r["saved_bytes_total"] / mib,
            r["saved_bytes_params"] / mib,
            r["saved_bytes_activations"] / mib,
            r["activations_vs_standard"],
            r["total_vs_standard"],
            r["distinct_storages"],
            r["param_bytes"] / mib,
        )
        for r in res["rows"]
    ]
    head = (
        f"One training forward, batch {res['batch']} x {res['seq']}, device {res['device']}: bytes of the "
        "distinct storages that autograd saves (saved_tensors_hooks, deduplicated by storage pointer). "
        "'params' = saved storages that are parameters; 'activations' = the rest. Scope 'decoder' = "
        "model.model only (no LM head / loss, whose fp32 logits dominate 'model+loss'). Activation checkpointing: "
        "attnres.models.enable_activation_checkpointing (non-reentrant; every decoder layer, AttnRes reads "
        "included, recomputed in backward); ratios are against standard without it."
    )
    return (
        head
        + "\n\n"
        + md_table(
            [
                "residual",
                "activation checkpointing",
                "scope",
                "saved MiB",
                "of which params MiB",
                "activations MiB",
                "activations ÷ standard",
                "total ÷ standard",
                "storages",
                "all params MiB",
            ],
            rows,
        )
    )


STEP_ONLY = {"shapes": None, "dtypes": "fp32,bf16", "modes": None, "warmup": 1, "no_two_phase_arm": False,
             "compile_mode": "default", "compile_backend": "inductor", "blocks": 8}


def check(args) -> None:
    """``memory`` takes step's options (one parser) but measures the reference model in fp32, eager, at
    --batch x --seq: a step-only option given to ``memory`` is an error, not silently ignored."""
    if args.command != "memory":
        return
    given = [k for k, default in STEP_ONLY.items() if getattr(args, k, default) != default]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise SystemExit(f"memory measures the reference model (fp32, eager) at --batch x --seq with --arms; "
                         f"{flags} belong to the step benchmark")


def add_args(p: argparse.ArgumentParser) -> None:
    pass  # shares --batch/--seq/--arms with step
