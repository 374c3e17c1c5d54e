"""The ``attnres`` command.

Exit codes: 0 success; 1 bad input (one line ``attnres: error: ...`` on stderr); 2 bad command-line
usage; 3 training stopped on a non-finite loss (no checkpoint written for it); 130 / 143 stopped by
SIGINT / SIGTERM after saving a checkpoint (continue with ``--resume``).

Only user errors get the one-line message: :class:`attnres.train.config.UserError` (config,
checkpoint and run-directory errors), a ValueError or ImportError raised by attnres's own code (its
input checks, e.g. of data sources), and OSError (a file or directory the user named). Anything
else (a TypeError, a KeyError, an error from inside torch) is a bug and keeps its traceback. Set
``ATTNRES_DEBUG=1`` to get the traceback of user errors too.

The console script is ``attnres_cli:main`` (the top-level module ``attnres_cli``, shipped with this
package): it owns the argument parser (:func:`build_parser`, re-exported here) and answers
``--help`` and usage errors without importing attnres, whose ``__init__`` loads torch and
transformers. After the command line parses it calls :func:`run` here. :func:`main` is the same
command in process (``python -m attnres.cli`` and the tests use it). Heavy imports (torch,
transformers) happen inside the subcommand handlers, not at module level.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

from attnres_cli import EPILOG, EXIT_USAGE, build_parser

EXIT_ERROR, EXIT_NONFINITE = 1, 3
__all__ = ["EPILOG", "EXIT_ERROR", "EXIT_NONFINITE", "EXIT_USAGE", "build_parser", "is_user_error", "main", "run"]


def _user_error(message: str) -> Exception:
    from .train.config import UserError

    return UserError(message)


def _positive(name: str, value, allow_zero: bool = False) -> None:
    """A flag that must be a positive (or, with ``allow_zero``, non-negative) finite number; None is unset."""
    if value is None:
        return
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise _user_error(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _demo(args: argparse.Namespace) -> int:
    _positive("--query-std", args.query_std, allow_zero=True)
    import torch

    from .models import AttnResConfig, AttnResForCausalLM
    from .train.optim import ATTNRES_PARAMS

    torch.manual_seed(args.seed)
    ids = torch.randint(0, 8192, (1, 32))
    print(f"Untrained models on random tokens. The AttnRes depth weights below come from random pseudo-queries "
          f"(std {args.query_std}, seed {args.seed}); a trained model's differ (see `attnres train`).")
    for residual in ("standard", "full", "block"):
        config = AttnResConfig(residual=residual)
        model = AttnResForCausalLM(config).eval()
        attnres_params = {name: p for name, p in model.named_parameters() if name.endswith(ATTNRES_PARAMS)}
        with torch.no_grad():
            for name, p in attnres_params.items():  # nudge the zero-init queries: input-dependent weights
                if name.endswith("pseudo_query"):
                    p.normal_(0, args.query_std)
            with model.model.record() as reads:
                model(ids)
        n = sum(p.numel() for p in model.parameters())
        extra = sum(p.numel() for p in attnres_params.values())
        size = f"block size {config.block_size} sublayers" if config.block_size else ""
        print(f"\n{residual:8s} params {n:,} (AttnRes {extra:,}) {size}")
        for r in reads:
            if r.weights is not None:
                w = r.weights.mean(dim=(1, 2)).tolist()
                print(f"  read {r.read:2d}: " + " ".join(f"{x:.2f}" for x in w))
    return 0


# ----------------------------------------------------------------------------- train / compare


def _progress(args) -> bool:
    return not args.no_progress


def _train_config(args, resume_out: Path | None):
    """The run's config: preset < --config < --set < dedicated flags. With --resume and neither
    --preset nor --config, the checkpoint's own config is the base."""
    from .train.config import check_scheme_keys, coerce, load_config, parse_set
    from .train.loop import saved_config

    overrides = parse_set(args.set)
    for key in ("residual", "max_steps", "seed", "eval_every", "checkpoint_every", "init"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if resume_out is not None and args.preset is None and args.config is None:
        cfg = replace(saved_config(resume_out), **{k: coerce(k, v) for k, v in overrides.items()})
        check_scheme_keys(cfg, overrides)
        return cfg.validate()
    return load_config(args.preset, args.config, overrides)


def _out(args, default: Path) -> Path:
    if args.out is None:
        return default
    if not args.out.strip():
        raise _user_error("--out is empty: give a directory")
    return Path(args.out)


def _summary_line(summary: dict, out: Path) -> str:
    return (
        f"{summary['residual']}: val_loss {summary['val_loss']:.4f}  ppl {summary['ppl']:.2f}  "
        f"bits/byte {summary['bpb']:.4f}  params {summary['params']:,}  "
        f"tokens/s {summary['tokens_per_s']:,.0f}  -> {out}"
    )


def _print_summary(summary: dict, out: Path) -> None:
    print(_summary_line(summary, out))


def _train(args: argparse.Namespace) -> int:
    from .train.checkpoint import find_checkpoint, load_trainer_state
    from .train.config import config_from_dict
    from .train.loop import check_resumable, train

    preset = args.preset or "default"
    out = _out(args, Path("runs") / f"train-{preset}-{args.residual or 'block'}")
    cfg = _train_config(args, out if args.resume else None)
    if args.resume:
        ckpt = find_checkpoint(out) if out.exists() else None
        state = load_trainer_state(ckpt) if ckpt is not None else None
        step = int(state["step"]) if state is not None else None
        if step == cfg.max_steps:  # train() refuses a changed config or a step past max_steps
            check_resumable(config_from_dict(state["train_config"]), cfg)
            if _rank() == 0:
                print(f"{out} is already finished (step {step} of max_steps {cfg.max_steps}); nothing to train. "
                      f"Give --max-steps N with N > {step} to train on.")
            # every rank reads the same file, so all return here or all go on to train() together
            # (a missing or damaged result.json: train() rewrites it without training)
            summary = _finished_summary(out)
            if summary is not None:
                if _rank() == 0:
                    _print_summary(summary, out)
                return 0
    summary = train(cfg, out, resume=args.resume, progress=_progress(args), overwrite=args.overwrite)
    if _rank() == 0:
        _print_summary(summary, out)
    return 0


def _finished_summary(out: Path) -> dict | None:
    """A finished run's ``result.json``, or None if it is missing or damaged."""
    try:
        summary = json.loads((out / "result.json").read_text())
        _summary_line(summary, out)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return summary


def _rank() -> int:
    """This process's rank in a torchrun job (0 for a single process): only rank 0 prints results."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def _compare(args: argparse.Namespace) -> int:
    from .train.compare import check_arms, compare, print_table, table_rows
    from .train.config import load_config, parse_set, read_yaml

    if args.seeds < 1:
        raise _user_error(f"--seeds must be >= 1, got {args.seeds}")
    if _world_size() > 1:
        raise _user_error("compare runs its arms in one process; under torchrun train each arm with "
                          "`attnres train --residual R` (README, 'Several processes')")
    overrides = parse_set(args.set)
    for key in ("residual", "seed"):
        if key in overrides:
            raise _user_error(
                f"compare sets {key!r} itself (the --arms; seeds 0..K-1 via --seeds); do not --set it"
            )
    preset = args.preset
    arms = check_arms(args.arms)
    # the config is checked as the first arm's; compare checks every arm's before it trains anything
    cfg = load_config(preset, args.config, {**overrides, "residual": arms[0]}, residuals=arms)
    out = _out(args, Path("runs") / f"compare-{preset}")
    seeds = list(range(args.seeds))
    runs = compare(
        cfg,
        out,
        seeds,
        preset=preset,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=_progress(args),
        argv=sys.argv[1:] if args.argv is None else args.argv,
        # what the user chose on this command line; on --resume it applies over the arms' saved config
        overrides=set(overrides) | (set(read_yaml(args.config)) - {"preset"} if args.config else set()),
        arms=arms,
    )
    print_table(table_rows(runs), f"attnres compare --preset {preset} --arms {','.join(arms)} "
                                  f"(seeds {', '.join(map(str, seeds))})")
    print(f"report: {out / 'report.md'}  summary: {out / 'summary.json'}")
    return 0


def _arms_config(args: argparse.Namespace, command: str, own: dict[str, str]):
    """(baseline, arms, config) of ablate / scaling: one process, seeds >= 1, and no --set of the keys the
    command sets itself (``own``: key -> the option that sets it; a --config's value for them is replaced)."""
    from .train.ablate import parse_arms
    from .train.config import load_config, parse_set

    if args.seeds < 1:
        raise _user_error(f"--seeds must be >= 1, got {args.seeds}")
    if _world_size() > 1:
        raise _user_error(f"{command} trains in this process (scaling: --jobs workers); run it without torchrun")
    overrides = parse_set(args.set)
    for key in ("residual", "seed", *own):
        if key in overrides:
            what = {"residual": "the ARMs", "seed": "--seeds", **own}[key]
            raise _user_error(f"{command} sets {key!r} itself ({what}); do not --set it")
    base, arms = parse_arms(args.arms, args.baseline)
    cfg = load_config(args.preset, args.config, {**overrides, "residual": base.scheme},
                      residuals=[a.scheme for a in arms])
    return base, arms, cfg


def _argv(args) -> list[str]:
    return sys.argv[1:] if args.argv is None else args.argv


def _ablate(args: argparse.Namespace) -> int:
    from .train.ablate import ablate, print_table

    base, arms, cfg = _arms_config(args, "ablate", {})
    out = _out(args, Path("runs") / f"ablate-{args.preset}")
    seeds = list(range(args.seeds))
    summary = ablate(cfg, out, arms, baseline=base, seeds=seeds, preset=args.preset, resume=args.resume,
                     overwrite=args.overwrite, progress=_progress(args), argv=_argv(args))
    print_table(summary, f"attnres ablate --preset {args.preset} (baseline {base.spec}; seeds "
                         f"{', '.join(map(str, seeds))})")
    print(f"report: {out / 'report.md'}  summary: {out / 'summary.json'}  plot: {out / 'ablate.png'}")
    return 0


SCALING_KEYS = {"max_steps": "--rungs", "schedule": "WSD", "decay_fraction": "--decay-fraction",
                "hidden_size": "--sizes", "num_hidden_layers": "--sizes", "intermediate_size": "--sizes"}


def _scaling(args: argparse.Namespace) -> int:
    from .train.scaling import scaling

    base, arms, cfg = _arms_config(args, "scaling", SCALING_KEYS)
    out = _out(args, Path("runs") / f"scaling-{args.preset}")
    sizes = [s for s in args.sizes.split(",") if s.strip()]
    scaling(cfg, out, arms, sizes=sizes, rungs=args.rungs, baseline=base, seeds=list(range(args.seeds)),
            decay_fraction=args.decay_fraction, jobs=args.jobs, overwrite=args.overwrite,
            keep_checkpoints=args.keep_checkpoints, progress=_progress(args), argv=_argv(args))
    print(f"report: {out / 'report.md'}  summary: {out / 'summary.json'}  plot: {out / 'scaling.png'}")
    return 0


# ----------------------------------------------------------------------------- eval / generate


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise _user_error(f"text file not found: {path}")
    if not p.is_file():
        raise _user_error(f"not a text file: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _user_error(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise _user_error(f"text file is empty: {path}")
    return text


def _eval(args: argparse.Namespace) -> int:
    # 0 is a value, not "unset": only None (the flag left out) takes the default
    _positive("--seq-len", args.seq_len)
    _positive("--batch-size", args.batch_size)
    _positive("--max-batches", args.max_batches)
    if args.seq_len is not None and args.seq_len < 2:
        raise _user_error(f"--seq-len must be >= 2 (a window predicts its tokens 2..N), got {args.seq_len}")
    if args.lm_eval is not None:
        return _eval_lm_eval(args)
    for flag, value in (("--lm-eval-include", args.lm_eval_include), ("--limit", args.limit)):
        if value is not None:
            raise _user_error(f"{flag} goes with --lm-eval")
    from .data import encode_text
    from .train.checkpoint import load_pretrained
    from .train.evaluate import evaluate

    text = _read_text(args.text)
    model, tokenizer, train_cfg = load_pretrained(args.checkpoint)
    seq_len = args.seq_len
    if seq_len is None:
        seq_len = (train_cfg or {}).get("seq_len") or min(256, model.config.max_position_embeddings)
    tokens = encode_text(tokenizer, text)
    if len(tokens) < seq_len:
        raise _user_error(
            f"text shorter than one sequence: {args.text} has {len(tokens)} tokens, seq_len is "
            f"{seq_len} (use --seq-len)"
        )
    r = evaluate(
        model,
        tokens,
        seq_len,
        args.batch_size,
        split_bytes=len(text.encode("utf-8")),
        max_batches=args.max_batches,
    )
    result = {"loss": r["loss"], "ppl": r["ppl"], "bits_per_byte": r["bpb"], "tokens": r["tokens"]}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"loss {r['loss']:.4f}  perplexity {r['ppl']:.2f}  bits/byte {r['bpb']:.4f}  "
            f"({r['tokens']:,} tokens predicted, windows of {seq_len})"
        )
    return 0


def _eval_lm_eval(args: argparse.Namespace) -> int:
    from .evaluate_lm import format_results, run_lm_eval

    if args.max_batches is not None:
        raise _user_error("--max-batches is for --text; with --lm-eval use --limit")
    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise _user_error(f"--limit must be a whole number of documents or a fraction < 1, got {limit}")
        limit = int(limit)
    result = run_lm_eval(args.checkpoint, args.lm_eval, include_path=args.lm_eval_include, limit=limit,
                         max_length=args.seq_len, batch_size=args.batch_size)
    print(json.dumps(result) if args.json else format_results(result))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .data import encode_text
    from .train.checkpoint import load_pretrained

    if not args.prompt:
        raise _user_error("--prompt is empty")
    _positive("--max-new-tokens", args.max_new_tokens)
    _positive("--temperature", args.temperature, allow_zero=True)
    _positive("--top-k", args.top_k, allow_zero=True)
    model, tokenizer, _ = load_pretrained(args.checkpoint)
    ids = torch.from_numpy(encode_text(tokenizer, args.prompt).astype("int64"))[None]
    if ids.numel() == 0:
        raise _user_error("--prompt encodes to no tokens")
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=args.temperature if sample else None,
        top_k=(args.top_k or None) if sample else None,
        top_p=None,
        pad_token_id=tokenizer.eos_token_id,
        eos_token_id=None,
    )
    print(tokenizer.decode(out[0].tolist(), skip_special_tokens=False))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .distributed.checkpoint import export_pretrained

    dest = export_pretrained(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {dest} (model.safetensors, config, tokenizer; load it in one process)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert.io import convert_checkpoint

    print(convert_checkpoint(args.src, args.out, args.source, args.target, args.missing_final, args.overwrite))
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    from .convert.upcycle import upcycle

    print(upcycle(args.src, args.out, args.residual, args.blocks, args.overwrite))
    return 0


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) if str(e).strip() else ""
    if isinstance(e, KeyError):  # KeyError quotes its message
        text = text.strip("'\"")
    return text or type(e).__name__


_PACKAGE = Path(__file__).resolve().parent


def _raised_by_attnres(e: BaseException) -> bool:
    """The innermost frame of ``e``'s traceback is attnres's own code (one of its ``raise``
    statements), not torch's, numpy's or the standard library's."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False


def is_user_error(e: BaseException) -> bool:
    """Bad input the user can fix (a one-line message), as opposed to a bug (a traceback)."""
    from .train.config import UserError

    if isinstance(e, UserError):
        return True
    if isinstance(e, OSError):  # a path the user named: missing, unreadable, not writable, disk full
        return True
    return isinstance(e, (ValueError, ImportError)) and _raised_by_attnres(e)


# the handler of each subcommand, looked up when it runs (so a test can replace one)
_HANDLERS = {"demo": "_demo", "compare": "_compare", "train": "_train", "eval": "_eval", "generate": "_generate",
             "export": "_export"}
_HANDLERS["convert"] = "_convert"
_HANDLERS["upcycle"] = "_upcycle"
_HANDLERS["ablate"] = "_ablate"
_HANDLERS["scaling"] = "_scaling"


def main(argv: list[str] | None = None) -> int:
    """The ``attnres`` command in process: parse ``argv`` (default ``sys.argv[1:]``) and :func:`run` it."""
    return run(build_parser().parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the parsed command ``args`` (from :func:`build_parser`; ``argv`` is the command line it came
    from, default ``sys.argv[1:]``) and return its exit code."""
    from .distributed.world import DistributedFailure, RankError, shutdown
    from .train.loop import NonFiniteLoss, TrainingInterrupted

    if getattr(args, "argv", "missing") is None:
        args.argv = list(sys.argv[1:] if argv is None else argv)
    main_rank = _rank() == 0  # in a torchrun job the ranks fail alike: rank 0 alone says so
    try:
        code = globals()[_HANDLERS[args.command]](args)
        shutdown()
        return code
    except TrainingInterrupted as e:
        _say(f"attnres: {e}", main_rank)
        return 128 + e.signum
    except NonFiniteLoss as e:
        _say(f"attnres: error: {_one_line(e)}", main_rank)
        return EXIT_NONFINITE
    except DistributedFailure as e:  # rank-specific: every rank says what it saw
        _say(f"attnres: error: {_one_line(e)}", True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("attnres: interrupted", main_rank)
        return 130
    except Exception as e:  # noqa: BLE001 - user errors in one line; anything else is a bug: traceback
        if os.environ.get("ATTNRES_DEBUG") or not is_user_error(e):
            raise
        _say(f"attnres: error: {_one_line(e)}", main_rank or isinstance(e, RankError))
        return EXIT_ERROR


def _say(line: str, show: bool) -> None:
    if show:
        sys.stderr.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
