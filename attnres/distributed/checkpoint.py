"""Checkpoints of a job of several processes, through ``torch.distributed.checkpoint`` (DCP).

``OUT/checkpoint/`` of such a run::

    dcp/                the model's and the optimizers' states ({"model": ..., "optim": ...} as
                        get_state_dict gives them, keyed by parameter name): .metadata and one
                        __R_0.distcp per rank, each rank writing its own part (a DDP replica is written once)
    config.json         the model's config, so the model can be built before its weights load
    tokenizer.json ...  as a single-process checkpoint's, and train_config.json
    trainer_state.pt    step, tokens, schedules, RNG states, metrics offset (no optimizer states), world_size

Atomic as a single process's: every rank writes into ``checkpoint.tmp``; once DCP has finished (its own
barriers: rank 0 writes ``.metadata`` after every rank's part is on disk) rank 0 adds the other files
and renames ``checkpoint.tmp`` to ``checkpoint``; the save returns on every rank only after that.
A job killed mid-save keeps the previous checkpoint.

Loading is by parameter name into whatever the model is now (DDP replicas, FSDP2 shards of any
number of processes, or one plain process), so ``--resume`` may change the number of processes or
``parallel``. A single-process checkpoint (``model.safetensors``, optimizer states by position)
also resumes on several processes (:func:`load_optimizer_states`). :func:`export_pretrained` turns a
checkpoint into a plain ``save_pretrained`` directory, in one process.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train.checkpoint import (
    CONFIG_FILE,
    SHARDED_DIR,
    CheckpointError,
    _normalize_modes,
    commit_checkpoint,
    fresh_tmp,
    is_sharded,
    load_pretrained,
    quiet_hf,
    set_rng_state,
)
from ..train.trainer import runs_part
from .world import World

__all__ = ["export_pretrained", "is_sharded", "load_optimizer_states", "load_sharded", "load_sharded_model",
           "restore", "save_sharded", "sharded_saver"]


def sharded_saver(out: Path, tokenizer, cfg, world: World):
    """The trainer's ``saver`` for a job of several processes (:func:`save_sharded` into ``out``)."""

    def save(state, trainer_state: dict[str, Any]) -> Path:
        return save_sharded(out, state, tokenizer, trainer_state, cfg.to_dict(), world)

    return save


def save_sharded(out: Path, state, tokenizer, trainer_state: dict[str, Any], train_config: dict[str, Any],
                 world: World) -> Path:
    """Every rank: write ``state``'s model and optimizers into ``OUT/checkpoint`` atomically (module
    docstring). ``trainer_state`` is rank 0's (its ``optimizers`` entry, if any, is not written)."""
    import torch.distributed.checkpoint as dcp

    tmp = world.on_main(fresh_tmp, out)
    model_sd, optim_sd = state_dicts(state)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / SHARDED_DIR)
    except dcp.CheckpointException as e:  # raised alike on every rank (a full disk, a permission)
        raise CheckpointError(f"cannot write {tmp / SHARDED_DIR}: {_gist(e)}") from None
    rest = {k: v for k, v in trainer_state.items() if k != "optimizers"}
    return world.on_main(_finish_save, out, tmp, state.model.config, tokenizer, {**rest, "world_size": world.size},
                         train_config)


def _finish_save(out: Path, tmp: Path, config, tokenizer, trainer_state, train_config) -> Path:
    config.save_pretrained(tmp)
    return commit_checkpoint(out, tmp, tokenizer, trainer_state, train_config)


def restore(state, ckpt: Path, saved: dict[str, Any]) -> None:
    """Everything checkpoint ``ckpt`` (trainer state ``saved``) restores into a freshly built ``state``:
    the weights of a sharded checkpoint (a single process's were loaded when the model was built), the
    optimizer states, the schedules, step and token count, and the RNG states."""
    if is_sharded(ckpt):
        load_sharded(state, ckpt)
    else:
        load_optimizer_states(state, saved["optimizers"])
    state.load_state_dict(saved)
    set_rng_state(saved["rng"])


def load_sharded(state, ckpt: Path) -> None:
    """The model's and optimizers' states of sharded checkpoint ``ckpt`` into ``state`` (any wrapping,
    any number of processes, one included). A parameter that never had a gradient has no optimizer
    state in the checkpoint: that is allowed (DISTRIBUTED.md §2); a missing weight is not."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    model_sd, optim_sd = state_dicts(state)
    _check_weights_present(ckpt, model_sd, state.model.config)
    sd = {"model": model_sd, "optim": optim_sd}
    _dcp_load(sd, ckpt, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dicts(state, sd["model"], sd["optim"])


def state_dicts(state) -> tuple[dict[str, Any], dict[str, Any]]:
    """``state``'s model and optimizer state dicts as this rank saves and loads them, keyed by parameter
    name: the whole model's (one process, DDP replicas, FSDP2 shards); under a pipeline
    (``state.wrapped.runs_part``) only the entries of this rank's parameters, with the optimizer states
    flattened per parameter (``param_groups.NAME.lr``: the ranks' param groups differ, so nested lists
    would collide in DCP's files)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(state.model, state.optimizers, options=_options(state))
    if runs_part(state.wrapped):
        others = {n for n, _ in state.model.named_parameters()} - {n for n, _ in state.wrapped.named_parameters()}
        model_sd = {k: v for k, v in model_sd.items() if k not in others}
    return model_sd, optim_sd


def set_state_dicts(state, model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
    """Load what :func:`state_dicts` gave (filled from a checkpoint) into ``state``."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(state.model, state.optimizers, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=_options(state))


def _options(state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    part = runs_part(state.wrapped)
    return StateDictOptions(flatten_optimizer_state_dict=part, strict=not part)


def _dcp_load(sd: dict[str, Any], ckpt: Path, alone: bool | None = None, **kwargs) -> None:
    """``dcp.load`` of ``ckpt``'s part into ``sd`` (in place): collectively in a job, or in this one
    process (``alone``; default: when there is no job), without DCP's warning that it assumes so.
    A missing or damaged file is a :class:`CheckpointError` naming the checkpoint."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if alone is None:
        alone = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            dcp.load(sd, checkpoint_id=Path(ckpt) / SHARDED_DIR, no_dist=alone, **kwargs)
        except dcp.CheckpointException as e:  # raised alike on every rank
            raise CheckpointError(f"cannot load {Path(ckpt) / SHARDED_DIR}: {_gist(e)}") from None


def _gist(e) -> str:
    """The first failing rank's error of a ``CheckpointException``, in one line."""
    exc, _ = next(iter(e.failures.values()))
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}{': ' + text if text else ''} (a file missing, truncated or unwritable?)"


def _check_weights_present(ckpt: Path, model_sd: dict[str, Any], config) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    from ..models import AttnResConfig

    saved = AttnResConfig.from_pretrained(ckpt)
    if saved.vocab_size != config.vocab_size:
        raise CheckpointError(f"tokenizer/model vocab mismatch: the data's tokenizer has {config.vocab_size} "
                              f"tokens, the checkpoint's model {saved.vocab_size}")
    keys = FileSystemReader(str(Path(ckpt) / SHARDED_DIR)).read_metadata().state_dict_metadata
    missing = [k for k in model_sd if f"model.{k}" not in keys]
    if missing:
        raise CheckpointError(f"{ckpt / SHARDED_DIR} has no weights for {len(missing)} parameter(s) of this "
                              f"model, e.g. {missing[0]!r}: it was written by another model")


def load_sharded_model(ckpt: Path) -> nn.Module:
    """The float32 model of sharded checkpoint ``ckpt``, in this one process (no process group)."""
    from ..models import AttnResConfig, AttnResForCausalLM

    try:
        config = AttnResConfig.from_pretrained(ckpt)
    except Exception as e:  # noqa: BLE001 - a missing or corrupt config.json
        raise CheckpointError(f"cannot read the model config in {ckpt}: {str(e).splitlines()[0]}") from None
    model = AttnResForCausalLM(config).float()
    sd = model.state_dict()
    _check_weights_present(ckpt, sd, config)
    _dcp_load({"model": sd}, ckpt, alone=True)
    model.load_state_dict(sd)
    return model


def load_optimizer_states(state, saved: list[dict[str, Any]]) -> None:
    """A single-process checkpoint's optimizer states (keyed by parameter position) into ``state``'s
    optimizers, whose parameters may be FSDP2 shards (then each rank keeps its part)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in state.model.parameters()):
        for o, s in zip(state.optimizers, saved, strict=True):
            o.load_state_dict(s)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(state.model, state.optimizers, _by_name(state, saved),
                             options=StateDictOptions(full_state_dict=True))


def _by_name(state, saved: list[dict[str, Any]]) -> dict[str, Any]:
    """Optimizer states keyed by parameter position, re-keyed by parameter name (get_state_dict's form)."""
    names = {p: n for n, p in state.model.named_parameters()}
    out: dict[str, Any] = {"state": {}, "param_groups": []}
    for opt, s in zip(state.optimizers, saved, strict=True):
        for group, saved_group in zip(opt.param_groups, s["param_groups"], strict=True):
            fqns = [names[p] for p in group["params"]]
            for i, fqn in zip(saved_group["params"], fqns, strict=True):
                if i in s["state"]:
                    out["state"][fqn] = s["state"][i]
            out["param_groups"].append({**saved_group, "params": fqns})
    return out


def export_pretrained(ckpt: str | Path, dest: str | Path) -> Path:
    """Write checkpoint (or run directory) ``ckpt``, sharded or not, as a plain directory that one
    process loads (``AttnResForCausalLM.from_pretrained``, ``attnres eval``): ``model.safetensors``,
    ``config.json``, the tokenizer and ``train_config.json``. ``dest`` must not hold files; it appears
    complete or not at all."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckpointError(f"{dest} already exists and is not an empty directory; give a new one")
    model, tokenizer, train_config = load_pretrained(ckpt)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with quiet_hf():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if train_config is not None:
        import json

        (tmp / CONFIG_FILE).write_text(json.dumps(train_config, indent=2) + "\n")
    _normalize_modes(tmp)
    if dest.exists():
        dest.rmdir()
    os.replace(tmp, dest)
    return dest


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank: ``model``'s whole weights as plain tensors, however it is sharded (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))

