"""lm-evaluation-harness on an attnres checkpoint (``attnres eval --checkpoint DIR --lm-eval TASKS``).

The checkpoint is loaded as for ``attnres eval`` (:func:`attnres.train.checkpoint.load_pretrained`: a run
directory, its ``checkpoint/``, a sharded checkpoint, any ``save_pretrained`` directory with a tokenizer) and
handed to lm-eval as an object, ``HFLM(pretrained=model, tokenizer=tokenizer)``, so nothing needs
``trust_remote_code`` or a hub name. lm-eval is an optional extra (``pip install 'attnres[eval]'``), imported
only here and only when called.

Windows: lm-eval scores a ``loglikelihood_rolling`` document in disjoint windows of ``max_length`` tokens,
the first conditioned on the prefix token (the tokenizer's BOS, else its EOS: ``<|endoftext|>`` for
attnres's byte / BPE tokenizers), each later one on the last token of the window before it. ``max_length``
here defaults to the run's training ``seq_len`` (as ``attnres eval --text`` does), else the model's
``max_position_embeddings``; ``--seq-len`` sets it.
"""

from __future__ import annotations

import math
from pathlib import Path

INSTALL_HINT = "pip install 'attnres[eval]'"


class LmEvalError(ValueError):
    """Bad input for an lm-eval run (a one-line CLI error)."""


def _import_harness():
    """``(lm_eval, HFLM, TaskManager)``, or a one-line error naming the extra when one is missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as e:
        missing = (e.name or "lm_eval").split(".")[0]
        what = "lm-evaluation-harness" if missing == "lm_eval" else f"{missing} (needed by lm-eval's HF backend)"
        raise LmEvalError(f"attnres eval --lm-eval needs {what}: {INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise LmEvalError("--lm-eval needs at least one task name (comma-separated)")
    return names


def default_max_length(model, train_config: dict | None) -> int:
    """The run's training ``seq_len`` when known, else ``config.max_position_embeddings``."""
    return int((train_config or {}).get("seq_len") or model.config.max_position_embeddings)


def run_lm_eval(
    checkpoint: str | Path,
    tasks: str | list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    max_length: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
    num_fewshot: int | None = None,
) -> dict:
    """Run lm-eval ``tasks`` (names or globs of lm-eval's index, or of task YAMLs under ``include_path``) on
    the checkpoint in ``checkpoint``.

    Returns ``{"results": {task: {metric: value}}, "n_samples": {task: n}, "max_length", "prefix_token_id",
    "lm_eval_version"}`` with lm-eval's metric keys (``"word_perplexity,none"``, ...). ``limit`` caps the
    documents per task (a fraction < 1 is a share of them).
    """
    from .train.checkpoint import load_pretrained

    names = parse_tasks(tasks)
    if include_path is not None and not Path(include_path).is_dir():
        raise LmEvalError(f"--lm-eval-include is not a directory: {include_path}")
    if limit is not None and not limit > 0:
        raise LmEvalError(f"--limit must be > 0, got {limit}")
    if max_length is not None and max_length < 2:
        raise LmEvalError(f"the window (--seq-len) must be >= 2 tokens, got {max_length}")
    lm_eval, HFLM, TaskManager = _import_harness()

    def missing(manager) -> list[str]:
        return [n for n in names if not manager.match_tasks([n]) and not Path(n).is_file()]

    manager = None
    if include_path is not None:  # tasks all of your own: skip indexing lm-eval's ~14k task YAMLs (~10 s)
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if missing(manager):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = missing(manager)
    if unknown:
        where = (f" nor under {include_path}" if include_path is not None
                 else " (add your own with --lm-eval-include DIR)")
        raise LmEvalError(f"unknown lm-eval task {unknown[0]!r}: not in lm-eval's task index{where}")

    model, tokenizer, train_config = load_pretrained(checkpoint)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    window = max_length if max_length is not None else default_max_length(model, train_config)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size, max_length=window)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False,
    )
    results = {
        task: {k: _plain(v) for k, v in metrics.items() if k not in ("name", "alias")}
        for task, metrics in out["results"].items()
    }
    return {
        "results": results,
        "n_samples": {t: n.get("effective", n) for t, n in out.get("n-samples", {}).items()},
        "max_length": lm.max_length,
        "prefix_token_id": lm.prefix_token_id,
        "lm_eval_version": out.get("lm_eval_version") or getattr(lm_eval, "__version__", None),
    }


def _plain(value):
    """A JSON value: numbers as float (NaN / inf as None), 'N/A' and other strings as they are."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return x if math.isfinite(x) else None


def format_results(result: dict) -> str:
    """One line per task and metric: ``task  metric  value [± stderr]``."""
    lines = []
    for task, metrics in result["results"].items():
        n = result["n_samples"].get(task)
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, float | int):
                continue
            err = metrics.get(f"{metric}_stderr,{filt}")
            tail = f" ± {err:.4g}" if isinstance(err, float) else ""
            docs = f"  ({n} docs)" if n is not None else ""
            lines.append(f"{task}  {metric}  {value:.6g}{tail}{docs}")
    lines.append(f"(lm-eval {result['lm_eval_version']}, windows of {result['max_length']} tokens)")
    return "\n".join(lines)
