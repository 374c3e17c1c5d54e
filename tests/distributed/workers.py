"""What each process of ``test_data_parallel.py`` runs (a module the spawned children import).

Every check runs the trainer's own ``forward_backward`` / ``optimizer_step`` on this rank's rows of the
same global micro-batches, and compares with a single-process run of the same model on the whole
batches, computed in the same process (so no second job is needed for the reference).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from attnres import AttnResForCausalLM
from attnres.distributed.checkpoint import restore, save_sharded
from attnres.distributed.data_parallel import apply_ddp, apply_fsdp, cpu_or_cuda_mesh
from attnres.distributed.world import World, init_distributed
from attnres.models import enable_activation_checkpointing
from attnres.train import load_config
from attnres.train.checkpoint import load_trainer_state, rng_state
from attnres.train.optim import build_optimizers, build_schedulers
from attnres.train.trainer import StepOutput, TrainState, forward_backward, optimizer_step

from ..train.helpers import Float64Loss

VOCAB = 257
MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=64, attn_res_num_blocks=2, tokenizer="byte", probes=False)
FP64 = dict(rtol=1e-10, atol=1e-13)
# AdamW divides by sqrt(v): a rounding-level difference in a near-zero gradient moves its weight by up to
# ~1e-13 (measured 7.8e-14 at lr 1e-2), so weights get an absolute tolerance 1e-12 (1e-10 of one update)
PARAM_TOL = dict(rtol=1e-10, atol=1e-12)
EXACT = dict(rtol=0, atol=0)
FROZEN = "model.norm.weight"  # resume(): a parameter that is never updated, so it has no optimizer state


def config(**kw):
    """Global micro-batch 4 x 16 tokens, 2 micro-batches a step, clipping active, a brisk lr."""
    return load_config("smoke", overrides={**MODEL, "batch_size": 4, "seq_len": 16, "grad_accum": 2,
                                           "grad_clip": 0.05, "lr": 1e-2, "warmup_steps": 1, **kw})


def join(rank: int, size: int, port: int) -> World:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return init_distributed("cpu")


def wrapper(kind: str, world: World):
    """``model -> what the step runs``: one process, DDP or FSDP2 (``fsdp-bf16``: the bf16 policy)."""
    mesh = cpu_or_cuda_mesh("cpu", world.size) if kind.startswith("fsdp") else None
    return {
        "single": Float64Loss,
        "ddp": lambda m: apply_ddp(Float64Loss(m), "cpu"),
        "fsdp": lambda m: Float64Loss(apply_fsdp(m, mesh)),
        "single-fp32": lambda m: m,
        "fsdp-bf16": lambda m: apply_fsdp(m, mesh, bf16=True),
        "fsdp-fp32": lambda m: apply_fsdp(m, mesh),
    }[kind]


def build(cfg, kind: str, world: World, dtype=torch.float64, ac: bool = False) -> TrainState:
    torch.manual_seed(cfg.seed)
    model = AttnResForCausalLM(cfg.model_config(vocab_size=VOCAB)).to(dtype).train()
    with torch.no_grad():  # no zero-initialised parameter: every gradient path is exercised
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if ac:
        enable_activation_checkpointing(model)
    wrapped = wrapper(kind, world)(model)
    opts = build_optimizers(model, cfg)
    return TrainState(model, wrapped, opts, build_schedulers(opts, cfg))


def batches(cfg, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return list(torch.randint(0, VOCAB, (cfg.grad_accum, cfg.batch_size, cfg.seq_len), generator=g))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


@dataclass
class Step:
    loss: float
    grad_norm: float
    grads: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]


def train_steps(state: TrainState, cfg, world: World, first: int, n: int, drop: str = "") -> list[Step]:
    """Steps ``first .. first + n - 1``, each on this rank's rows, as the Trainer takes them; ``drop``
    names a parameter whose gradient is dropped before each update (so it has no optimizer state)."""
    out = []
    for step in range(first, first + n):
        raw = forward_backward(state, [world.shard(b) for b in batches(cfg, step)], cfg)
        loss, gn = StepOutput(world.mean(raw.micro_losses), raw.grad_norm).read()
        if drop:
            state.model.get_parameter(drop).grad = None
        grads = {n: full(p.grad) for n, p in state.model.named_parameters() if p.grad is not None}
        optimizer_step(state, cfg)
        out.append(Step(loss, gn, grads, {n: full(p) for n, p in state.model.named_parameters()}))
    return out


def assert_same(got: list[Step], want: list[Step], what: str, tol=FP64, param_tol=PARAM_TOL) -> None:
    def close(a, b, name, t):
        torch.testing.assert_close(a, b, **t, msg=lambda m: f"{what}, {name}: {m}")

    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        close(a.loss, b.loss, f"step {k} loss", tol)
        close(a.grad_norm, b.grad_norm, f"step {k} grad norm", tol)
        for name in b.grads:
            close(a.grads[name], b.grads[name], f"step {k} grad of {name}", tol)
            close(a.params[name], b.params[name], f"step {k} {name}", param_tol)


# ----------------------------------------------------------------------------- the workers


def parity(rank: int, size: int, port: int, out: str) -> None:
    """DDP and FSDP2 (fp64) == one process, 2 steps, every grad and parameter, for each residual; with
    activation checkpointing too; FSDP2's bf16 policy keeps AttnRes fp32; bad dtype mixes are refused."""
    world = join(rank, size, port)
    report = {}
    for residual in ("standard", "block", "full"):
        cfg = config(residual=residual)
        ref = train_steps(build(cfg, "single", world), cfg, World(), 0, 2)
        for kind in ("ddp", "fsdp"):
            got = train_steps(build(cfg, kind, world), cfg, world, 0, 2)
            report[f"{residual} {kind}"] = max_diff(got, ref)
            assert_same(got, ref, f"{residual} {kind}")
            if residual != "standard":
                got = train_steps(build(cfg, kind, world, ac=True), cfg, world, 0, 2)
                assert_same(got, ref, f"{residual} {kind} + activation checkpointing")
    report["bf16"] = bf16_policy(world)
    refuse_mixed_dtypes(world)
    if world.is_main:
        Path(out, "parity.json").write_text(json.dumps(report, indent=2))


def max_diff(got: list[Step], want: list[Step]) -> dict[str, float]:
    pairs = list(zip(got, want, strict=True))

    def worst(field: str) -> float:
        return max((getattr(a, field)[n] - getattr(b, field)[n]).abs().max().item() for a, b in pairs
                   for n in getattr(b, field))

    return {"loss": max(abs(a.loss - b.loss) / abs(b.loss) for a, b in pairs), "grad": worst("grads"),
            "param": worst("params")}


def bf16_policy(world: World) -> dict[str, float]:
    """FSDP2 with bf16=True: the layers compute in bf16, every DepthQuery stays fp32 (its parameters in
    forward, its output: the query the depth softmax uses), the losses follow fp32's, probes work."""
    from attnres.analysis import collect_probes

    out = {}
    for residual in ("block", "full"):
        cfg = config(residual=residual, bf16=True)
        ref = train_steps(build(cfg, "single-fp32", world, torch.float32), cfg, World(), 0, 2)
        state = build(cfg, "fsdp-bf16", world, torch.float32, ac=residual == "full")
        seen = _watch_dtypes(state.model)
        got = train_steps(state, cfg, world, 0, 2)
        assert seen == {"query param": {torch.float32}, "query out": {torch.float32}, "linear": {torch.bfloat16}}, seen
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a.loss, b.loss, rtol=2e-2, atol=0)
        grads = [p.grad for n, p in state.model.named_parameters() if "_res." in n]
        assert grads and all(g.dtype == torch.float32 for g in grads)
        probes = collect_probes(state.model, batches(cfg, 5)[0])  # every read recorded inside the layers
        assert len(probes["hidden_rms"]) == 2 * cfg.num_hidden_layers + 1
        out[residual] = max(abs(a.loss - b.loss) / b.loss for a, b in zip(got, ref, strict=True))
    # delta's query subclass is read outside its forward (the gate), so it stays in its layer's group
    cfg = config(residual="delta", bf16=True)
    ref = train_steps(build(cfg, "single-fp32", world, torch.float32), cfg, World(), 0, 2)
    got = train_steps(build(cfg, "fsdp-bf16", world, torch.float32), cfg, world, 0, 2)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.loss, b.loss, rtol=2e-2, atol=0)
    out["delta"] = max(abs(a.loss - b.loss) / b.loss for a, b in zip(got, ref, strict=True))
    return out


def _watch_dtypes(model) -> dict[str, set]:
    from attnres.residual import DepthQuery

    seen: dict[str, set] = {"query param": set(), "query out": set(), "linear": set()}
    for m in model.modules():
        if isinstance(m, DepthQuery):  # pre-hooks added after FSDP's run once it has all-gathered
            m.register_forward_pre_hook(lambda m, a: seen["query param"].add(m.pseudo_query.dtype))
            m.register_forward_hook(lambda m, a, y: seen["query out"].add(y.dtype))
    model.model.layers[0].mlp.gate_proj.register_forward_pre_hook(lambda m, a: seen["linear"].add(m.weight.dtype))
    return seen


def refuse_mixed_dtypes(world: World) -> None:
    from attnres.train import ConfigError

    cfg = config(residual="block")
    model = AttnResForCausalLM(cfg.model_config(vocab_size=VOCAB))
    model.model.layers[1].mlp.to(torch.bfloat16)
    try:
        apply_fsdp(model, cpu_or_cuda_mesh("cpu", world.size))
    except ConfigError as e:
        assert "model.layers.1 mixes parameter dtypes (bfloat16, float32)" in str(e) and "\n" not in str(e), e
    else:
        raise AssertionError("FSDP2 sharded a layer of mixed dtypes")


def resume(rank: int, size: int, port: int, out: str) -> None:
    """DCP: 2 steps, save, a fresh model restores, 2 more == 4 uninterrupted steps, bitwise (DDP and
    FSDP2, fp64; one parameter is never updated, so the checkpoint lacks its optimizer state). Leaves
    the FSDP2 checkpoint, the 4-step single-process losses and, from an fp32 FSDP2 run, a checkpoint
    and its live logits for the parent's 2 -> 1 process and export checks."""
    from attnres.data.tokenizer import byte_tokenizer

    world, root = join(rank, size, port), Path(out)
    cfg, tok = config(residual="block"), byte_tokenizer()
    frozen = FROZEN
    for kind in ("ddp", "fsdp"):
        whole = train_steps(build(cfg, kind, world), cfg, world, 0, 4, frozen)
        first = build(cfg, kind, world)
        train_steps(first, cfg, world, 0, 2, frozen)
        assert all(first.model.get_parameter(frozen) not in o.state for o in first.optimizers)
        ckpt = save_sharded(root / kind, first, tok, trainer_state(first, cfg), cfg.to_dict(), world)
        again = build(cfg, kind, world)
        restore(again, ckpt, load_trainer_state(ckpt))
        assert again.step == 2
        assert_same(train_steps(again, cfg, world, 2, 2, frozen), whole[2:], f"{kind} resumed", EXACT, EXACT)
    single = train_steps(build(cfg, "single", world), cfg, World(), 0, 4, frozen)
    fp32 = build(config(residual="block"), "fsdp-fp32", world, torch.float32)
    train_steps(fp32, cfg, world, 0, 1)
    save_sharded(root / "fsdp-fp32", fp32, tok, trainer_state(fp32, cfg), cfg.to_dict(), world)
    with torch.no_grad():
        logits = fp32.model(batches(cfg, 9)[0]).logits
    if world.is_main:
        (root / "single.json").write_text(json.dumps([s.loss for s in single]))
        torch.save(logits, root / "logits.pt")


def trainer_state(state: TrainState, cfg) -> dict:
    return {**state.state_dict(), "rng": rng_state(), "metrics_pos": 0, "train_config": cfg.to_dict(),
            "params": state.num_params()}
