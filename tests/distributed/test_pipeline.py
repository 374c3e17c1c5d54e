"""Pipeline parallelism in real processes (torch.multiprocessing, gloo, 2 ranks, fp64) against a
single-process run of the same model on the same microbatches: the loss and every gradient (by parameter
name), for every schedule, cache and naive, block sizes that do and do not line up with the stages, Full and
standard, an uneven split, two steps (an SGD update between them), ``eval_loss`` through the pipeline (which
leaves the gradients alone), activation checkpointing inside the stages. ``Pipeline.step`` checks the
store itself (what each stage finds, every gradient deposit, empty after the step).

One spawn runs every case (the processes' start-up is most of the cost); each case is a test reading its
result. Bad plans: one-line ConfigErrors from ``check_plan``, no processes needed.
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from attnres import AttnResConfig, AttnResForCausalLM
from attnres.distributed.pipeline import build_pipeline, check_plan, next_token_loss
from attnres.distributed.pipeline.runtime import SPLIT_BACKWARD
from attnres.distributed.plan import SCHEDULES, ParallelPlan
from attnres.models import enable_activation_checkpointing
from attnres.train.config import ConfigError

MICRO, VOCAB, LR = 4, 64, 0.1
TOL = 1e-12


@dataclass(frozen=True)
class Case:
    schedule: str
    residual: str = "block"
    S: int | None = 2  # sublayers per block (block only)
    cache: bool = True
    layers: int = 4
    V: int | None = None  # default: 1 for GPipe/1F1B, else 2
    split: tuple[int, ...] | None = None
    checkpointing: bool | str = False  # True, or "reentrant"
    keep_exit: bool = True
    seq: int = 8
    P: int = 2  # processes
    micro: int = MICRO  # microbatches, of one row each
    options: tuple[tuple[str, object], ...] = ()  # more config keys (a Table 4 ablation)

    @property
    def virtual(self) -> int:
        return self.V or (1 if self.schedule in ("GPipe", "1F1B") else 2)

    @property
    def name(self) -> str:
        res = f"block-S{self.S}" if self.residual == "block" else self.residual
        extra = [f"V{self.V}"] if self.V else []
        extra += [f"split{'-'.join(map(str, self.split))}"] if self.split else []
        extra += ["ckpt" + ("-reentrant" if self.checkpointing == "reentrant" else "")] if self.checkpointing else []
        extra += ["paper-exit"] if not self.keep_exit else []
        extra += [f"T{self.seq}"] if self.seq != 8 else []
        extra += [f"{k}={v}" for k, v in self.options]
        return "-".join([self.schedule, f"P{self.P}", res, "cache" if self.cache else "naive", *extra])


def _cases() -> list[Case]:
    cases = []
    for s in SCHEDULES:  # S=2: one block per stage (two for V=1); S=3 straddles every stage boundary
        cases += [Case(s), Case(s, S=3), Case(s, S=3, cache=False), Case(s, "full", None),
                  Case(s, "standard", None)]
    return cases + [
        Case("Interleaved1F1B", S=3, layers=5, split=(2, 1, 1, 1)),
        Case("Interleaved1F1B", S=2, layers=6, V=3),
        Case("LoopedBFS", S=3, keep_exit=False),
        Case("Interleaved1F1B", S=3, seq=64),  # 64-token microbatches: the two-phase reads
        Case("Interleaved1F1B", S=3, options=(("attn_res_query", "input_dependent"),)),  # the ablation path
        Case("1F1B", S=3, checkpointing=True),
        Case("InterleavedZeroBubble", S=3, checkpointing=True),
        Case("DualPipeV", S=2, checkpointing=True),
        Case("1F1B", S=3, checkpointing="reentrant"),
        # four processes: hops carry up to P - 1 cached blocks' worth of delta
        Case("Interleaved1F1B", S=3, layers=8, P=4),
        Case("Interleaved1F1B", S=3, layers=8, P=4, cache=False),
        Case("DualPipeV", "full", None, layers=8, P=4, micro=8),
    ]


CASES = _cases()


# ----------------------------------------------------------------------------- in the spawned processes

def _model(case: Case) -> AttnResForCausalLM:
    config = AttnResConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=case.layers,
        num_attention_heads=2, num_key_value_heads=1, residual=case.residual,
        attn_res_block_size=case.S if case.residual == "block" else None, use_cache=False, **dict(case.options),
    )
    torch.manual_seed(0)
    return AttnResForCausalLM(config).double()


def _reference_step(ref: AttnResForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    ref.zero_grad(set_to_none=True)
    micro = len(ids)  # one row per microbatch
    loss = sum(next_token_loss(ref(input_ids=c).logits, c) for c in ids.chunk(micro)) / micro
    loss.backward()
    return loss.detach()


def _max_diff(named: dict, other: dict) -> float:
    return max(((a.grad - other[n].grad).abs().max().item() for n, a in named.items()), default=0.0)


def _count_calls(pipe) -> list[int]:
    counts = []
    for module in pipe.modules.values():
        for layer in module.model.layers.values():
            counts.append(0)
            i = len(counts) - 1
            # a pre-hook: a recompute may stop early, after the last tensor backward needs
            layer.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _run_case(case: Case, rank: int) -> dict:
    model = _model(case)
    ref = copy.deepcopy(model)
    if case.checkpointing:
        enable_activation_checkpointing(model, use_reentrant=case.checkpointing == "reentrant")
    plan = ParallelPlan(case.P, pipeline_stages=case.P, pipeline_virtual=case.virtual, pipeline_schedule=case.schedule,
                        pipeline_microbatches=case.micro, pipeline_cache=case.cache)
    pipe = build_pipeline(model, plan, batch_size=case.micro, seq_len=case.seq, split=case.split,
                          keep_exit=case.keep_exit)
    named, refp = dict(pipe.named_parameters()), dict(ref.named_parameters())
    calls = _count_calls(pipe)
    gen = torch.Generator().manual_seed(1)
    out = {"case": case.name, "rank": rank, "names": sorted(named), "dloss": [], "dgrad": [], "losses": [],
           "hops": pipe.layout.hop_tensors(), "stored": pipe.layout.stored()}
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (case.micro, case.seq), generator=gen)
        loss, want = pipe.step(ids, ids), _reference_step(ref, ids)
        out["losses"].append(loss.item())
        out["dloss"].append(abs(loss.item() - want.item()))
        out["missing"] = sorted(n for n, p in named.items() if p.grad is None)
        out["dgrad"].append(_max_diff(named, refp))
        with torch.no_grad():
            for p in named.values():
                p -= LR * p.grad
            for p in ref.parameters():
                p -= LR * p.grad
    out["calls"] = list(calls)
    ids = torch.randint(0, VOCAB, (case.micro, case.seq), generator=gen)
    before = {n: p.grad.clone() for n, p in named.items()}
    loss = pipe.eval_loss(ids, ids)
    with torch.no_grad():
        want = sum(next_token_loss(ref(input_ids=c).logits, c) for c in ids.chunk(case.micro)) / case.micro
    out["eval_dloss"] = abs(loss.item() - want.item())
    out["eval_grad_change"] = max((named[n].grad - g).abs().max().item() for n, g in before.items())
    out["store_left"] = len(pipe.store.leaves) + len(pipe.store.deposits) + len(pipe.store.wire)
    return out


def _worker(rank: int, world: int, init: str, out_dir: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        with open(Path(out_dir) / f"rank{rank}.jsonl", "w") as f:
            for case in CASES:
                if case.name not in names or case.P != world:
                    continue
                t0 = time.perf_counter()
                try:
                    res = _run_case(case, rank)
                except Exception:
                    f.write(json.dumps({"case": case.name, "rank": rank, "error": traceback.format_exc()}) + "\n")
                    raise
                res["seconds"] = time.perf_counter() - t0
                f.write(json.dumps(res) + "\n")
                f.flush()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- in pytest

def spawn(fn, args: tuple, nprocs: int, timeout: float = 600) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes; raise if one fails or time runs out."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"spawned processes still running after {timeout} s")


def _results(out: Path) -> dict[str, list[dict]]:
    res: dict[str, list[dict]] = {}
    for f in sorted(out.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            res.setdefault(row["case"], []).append(row)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One spawn per process count runs all its cases."""
    names, res = [c.name for c in CASES], {}
    for world in sorted({c.P for c in CASES}):
        out = tmp_path_factory.mktemp(f"pipeline{world}")
        spawn(_worker, (world, f"file://{out}/store", str(out), names), nprocs=world)
        res |= _results(out)
    return res


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pipeline_matches_one_process(results, case):
    rows = results.get(case.name, [])
    assert len(rows) == case.P, f"{case.name}: results from {len(rows)} ranks"
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    full = {n for n, _ in _model(case).named_parameters()}
    assert set().union(*(r["names"] for r in rows)) == full  # every parameter is on some stage
    for r in rows:
        assert r["missing"] == []
        assert max(r["dgrad"]) <= TOL, f"rank {r['rank']}: max |grad - reference| {r['dgrad']}"
        assert r["eval_grad_change"] == 0.0  # eval neither rescales nor touches gradients
        assert r["store_left"] == 0
    losses = [r for r in rows if r["losses"]]
    assert all(max(r["dloss"]) <= TOL and r["eval_dloss"] <= TOL for r in losses)
    assert all(r["losses"] == rows[0]["losses"] for r in rows)  # every rank returns the loss


def _row(results, name: str) -> dict:
    return results[name][0]


PAIRS = [(Case(s, S=3), Case(s, S=3, cache=False)) for s in SCHEDULES]
PAIRS += [(Case("Interleaved1F1B", S=3, layers=8, P=4), Case("Interleaved1F1B", S=3, layers=8, P=4, cache=False))]


@pytest.mark.parametrize(("cached", "naive"), PAIRS, ids=[c.name for c, _ in PAIRS])
def test_cache_sends_less_and_agrees_with_naive(results, cached, naive):
    c, n = _row(results, cached.name), _row(results, naive.name)
    assert c["losses"] == pytest.approx(n["losses"], abs=TOL, rel=0)
    if cached.virtual > 1:
        assert c["stored"] > 0 and sum(c["hops"]) < sum(n["hops"])


@pytest.mark.parametrize("case", [c for c in CASES if c.checkpointing], ids=lambda c: c.name)
def test_checkpointing_recomputes_inside_stages(results, case):
    """Every layer runs again in backward (2 steps x 4 microbatches, forward + recompute). Under split-backward
    schedules torch 2.13 runs backward in several passes, each recomputing: right gradients, more compute."""
    for r in results[case.name]:
        if case.schedule in SPLIT_BACKWARD:
            assert all(n >= 2 * 2 * MICRO for n in r["calls"]), r["calls"]
        else:
            assert r["calls"] == [2 * 2 * MICRO] * len(r["calls"])


def test_reentrant_checkpointing_is_refused_under_split_backward():
    model = _model(Case("InterleavedZeroBubble"))
    enable_activation_checkpointing(model, use_reentrant=True)
    plan = ParallelPlan(2, pipeline_stages=2, pipeline_virtual=2, pipeline_schedule="InterleavedZeroBubble")
    with pytest.raises(ConfigError, match="use_reentrant=False"):
        build_pipeline(model, plan, batch_size=MICRO, seq_len=8)


def test_without_checkpointing_layers_run_once(results):
    for r in results[Case("1F1B", S=3).name]:
        assert r["calls"] == [2 * MICRO] * len(r["calls"])


# ----------------------------------------------------------------------------- bad plans

def _config(layers: int = 4, **kw) -> AttnResConfig:
    return AttnResConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, **kw)


@pytest.mark.parametrize(
    ("plan", "batch", "config", "split", "match"),
    [
        (ParallelPlan(2, pipeline_stages=2, pipeline_virtual=2, pipeline_schedule="Interleaved1F1B"), 4, _config(6),
         None, "num_hidden_layers=6 does not split into pipeline_stages x pipeline_virtual = 4 equal stages"),
        (ParallelPlan(2, pipeline_stages=2, pipeline_virtual=2, pipeline_schedule="Interleaved1F1B"), 4, _config(6),
         (3, 1, 1), "the split \\(3, 1, 1\\) must give each of the 4 stages"),
        (ParallelPlan(2, pipeline_stages=2, pipeline_virtual=2, pipeline_schedule="LoopedBFS"), 6, _config(4),
         None, "batch_size=6 does not split into 4 microbatches"),
        (ParallelPlan(2, pipeline_stages=2, pipeline_schedule="1F1B", pipeline_microbatches=1), 4, _config(4),
         None, "1F1B needs at least pipeline_stages=2 microbatches"),
        (ParallelPlan(2, pipeline_stages=2, pipeline_virtual=2, pipeline_schedule="DualPipeV",
                      pipeline_microbatches=2), 4, _config(4), None, "DualPipeV needs at least 4 microbatches"),
        (ParallelPlan(4, pipeline_stages=4, pipeline_virtual=1, pipeline_schedule="Interleaved1F1B",
                      pipeline_microbatches=9), 18, _config(4), None, "multiple of its rounds"),
        (ParallelPlan(2, pipeline_stages=2, pipeline_virtual=2, pipeline_schedule="GPipe"), 4, _config(4), None,
         "GPipe runs one stage per rank"),
        (ParallelPlan(2, pipeline_stages=2, pipeline_virtual=3, pipeline_schedule="ZBVZeroBubble"), 6, _config(6),
         None, "ZBVZeroBubble runs two stages per rank"),
        (ParallelPlan(2, pipeline_stages=2, pipeline_schedule="Bubbles"), 4, _config(4), None,
         "pipeline_schedule must be one of"),
        (ParallelPlan(3, pipeline_stages=2), 4, _config(4), None, "world_size=3 is not a multiple"),
        (ParallelPlan(4, pipeline_stages=2), 6, _config(4), None, "batch_size=6 \\(3 rows for each of 2 pipelines\\)"),
        (ParallelPlan(4, pipeline_stages=2), 5, _config(4), None, "over 2 data-parallel pipelines"),
        (ParallelPlan(2, pipeline_stages=2), 4, _config(4, tie_word_embeddings=True), None, "tie_word_embeddings"),
        (ParallelPlan(2, pipeline_stages=2), 4, _config(4, residual="hc"), None, "got residual='hc'"),
    ],
)
def test_bad_plans_are_one_line_config_errors(plan, batch, config, split, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_plan(plan, config, batch, split)
    assert "\n" not in str(e.value)


def test_good_plans_pass():
    check_plan(ParallelPlan(2, pipeline_stages=2, pipeline_virtual=2, pipeline_schedule="ZBVZeroBubble"), _config(4), 4)
    check_plan(ParallelPlan(2, pipeline_stages=2, pipeline_virtual=2, pipeline_schedule="LoopedBFS"), _config(5), 8,
               (2, 1, 1, 1))
