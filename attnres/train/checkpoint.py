"""Checkpoints that are never half-written.

``OUT/checkpoint/`` holds the model (``save_pretrained``, safetensors), the tokenizer
(``save_pretrained``), ``train_config.json`` and ``trainer_state.pt`` (optimizer and scheduler
states, torch/numpy/python RNG states, step, tokens seen, byte offset of ``metrics.jsonl``).

Loading a checkpoint never runs code from it: ``trainer_state.pt`` holds only tensors and plain
ints/floats/str/None/lists/dicts (the numpy and python RNG states are stored as int64 tensors, see
:func:`rng_state`) and is read with ``torch.load(weights_only=True)``. A state file that needs
more (a pickled object, or the numpy arrays of a checkpoint written before this format) is
refused with a :class:`CheckpointError`, never unpickled. Weights are checked before they load: a
truncated or corrupt ``model.safetensors`` is a :class:`CheckpointError` naming the file.

Every file in a checkpoint gets the mode a new file gets under the umask (0644 under umask 022),
including ``model.safetensors``, which ``safetensors`` itself writes as 0600.

A save writes ``checkpoint.tmp`` completely, renames the current ``checkpoint`` to
``checkpoint.old``, renames ``checkpoint.tmp`` to ``checkpoint`` and only then deletes
``checkpoint.old``. A crash at any point leaves a complete checkpoint under ``checkpoint`` or
``checkpoint.old``; :func:`find_checkpoint` recovers the latter.

A run of several processes (torchrun) writes the weights and the optimizer states with
``torch.distributed.checkpoint`` into ``dcp/`` instead, each rank its own part, next to ``config.json``
and the same other files (``trainer_state.pt`` then holds no optimizer states); see
:mod:`attnres.distributed.checkpoint`. :func:`load_model` reads either kind in one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import UserError

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
SHARDED_DIR = "dcp"  # a checkpoint of several processes: torch.distributed.checkpoint's files


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or not ours."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file and rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """The torch (CPU, and CUDA if present), numpy and python RNG states, in a form that
    ``torch.load(weights_only=True)`` accepts: tensors and plain ints/floats/str/None."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),  # uint32 words, exact in int64
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),  # 624 uint32 words and the index
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def quiet_hf():
    """No transformers progress bars ("Writing model shards", "Loading weights") while inside."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _umask() -> int:
    try:  # Linux >= 4.7: read it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normalize_modes(root: Path) -> None:
    """Give every file under ``root`` the mode a new file gets under the umask (0644 under 022).

    ``safetensors``' ``save_file`` (as of 0.8) writes ``model.safetensors`` as 0600 whatever the
    umask, while everything else in the checkpoint is created with the umask's mode.
    """
    mode = 0o666 & ~_umask()
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def _commit(out: Path, tmp: Path) -> None:
    """checkpoint.tmp -> checkpoint, keeping the previous one as checkpoint.old until done."""
    final, old = out / CHECKPOINT, out / (CHECKPOINT + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(
    out_dir: str | Path, model, tokenizer, state: dict[str, Any], train_config: dict[str, Any]
) -> Path:
    """Atomically write ``OUT/checkpoint`` (see the module docstring); returns its path."""
    out = Path(out_dir)
    tmp = fresh_tmp(out)
    with quiet_hf():
        model.save_pretrained(tmp)
    return commit_checkpoint(out, tmp, tokenizer, state, train_config)


def fresh_tmp(out: Path) -> Path:
    """An empty ``OUT/checkpoint.tmp`` (a leftover of an interrupted save is removed)."""
    tmp = out / (CHECKPOINT + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(out: Path, tmp: Path, tokenizer, state: dict[str, Any], train_config: dict[str, Any]) -> Path:
    """Add the tokenizer, ``train_config.json`` and ``trainer_state.pt`` to the weights already in
    ``tmp``, then make ``tmp`` the checkpoint (see the module docstring); returns its path."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / CONFIG_FILE).write_text(json.dumps(train_config, indent=2) + "\n")
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _normalize_modes(tmp)
    _commit(out, tmp)
    return out / CHECKPOINT


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """``OUT/checkpoint`` if there is one; recovers ``checkpoint.old`` left by a crash mid-save."""
    out = Path(out_dir)
    final, old, tmp = out / CHECKPOINT, out / (CHECKPOINT + ".old"), out / (CHECKPOINT + ".tmp")
    if not final.exists() and old.exists() and (old / STATE_FILE).exists():
        with contextlib.suppress(FileNotFoundError):  # another process of the job got there first
            os.replace(old, final)
    if final.exists() and (final / STATE_FILE).exists():
        for leftover in (old, tmp):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
        return final
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state of ``ckpt``, read with ``weights_only=True``: never runs code from the file.

    A file that needs anything beyond tensors and plain Python values (a pickled object, or the
    numpy RNG arrays of the older format) is refused, not unpickled.
    """
    path = Path(ckpt) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch.save writes a zip; anything else reached torch's legacy loader as garbage
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is corrupt or truncated: not a torch.save zip archive") from None
        if "weights only load failed" not in str(e).lower():
            raise CheckpointError(f"{path} is corrupt or truncated: {_first_line(e)}") from None
        raise CheckpointError(
            f"refusing to load {path}: it is in an old or unsafe format (it holds pickled Python "
            f"objects beyond tensors and plain values, e.g. a trainer state written by an older "
            f"attnres, which kept numpy RNG arrays); it was not unpickled. Start the run afresh "
            f"(--overwrite) or resume it with the attnres version that wrote it"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # noqa: BLE001 - a bad zip/stream surfaces as many exception types
        raise CheckpointError(f"{path} is corrupt or truncated: {_first_line(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not an attnres trainer state (holds a {type(state).__name__})")
    return state


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a run directory (``OUT``) or the checkpoint directory itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint must be a directory, got file {path}")
    if not (path / "config.json").exists():
        found = find_checkpoint(path)
        if found is not None:
            return found
        raise CheckpointError(f"{path} is not an attnres checkpoint (no config.json)")
    return path


def _check_weights(ckpt: Path) -> None:
    """Every safetensors file of ``ckpt`` opens and its header covers the file exactly."""
    from safetensors import safe_open

    single, index = ckpt / "model.safetensors", ckpt / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        try:
            files = [ckpt / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is corrupt: {_first_line(e)}") from None
    else:
        raise CheckpointError(f"{ckpt} has no model.safetensors")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {index})")
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise CheckpointError(f"{f} is corrupt or truncated: {_first_line(e)}") from None


def is_sharded(ckpt: str | Path) -> bool:
    """Whether ``ckpt`` is a checkpoint of several processes: weights and optimizer states in
    ``dcp/`` (:mod:`attnres.distributed.checkpoint`) instead of ``model.safetensors``."""
    return (Path(ckpt) / SHARDED_DIR / ".metadata").is_file()


def load_model(ckpt: str | Path):
    """The float32 :class:`AttnResForCausalLM` saved in ``ckpt`` (one process's checkpoint, or a
    sharded one of several); :class:`CheckpointError` (naming the file) if its weights are missing,
    truncated or corrupt."""
    from ..models import AttnResForCausalLM

    ckpt = Path(ckpt)
    if is_sharded(ckpt):
        from ..distributed.checkpoint import load_sharded_model

        return load_sharded_model(ckpt)
    _check_weights(ckpt)
    try:
        with quiet_hf():
            return AttnResForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - corrupt weights surface as many exception types
        raise CheckpointError(f"cannot load the model in {ckpt}: {_first_line(e)}") from None


def attnres_config_json(ckpt: Path, error: type[Exception] = CheckpointError, prefix: str = "") -> dict:
    """``ckpt/config.json`` as a dict; ``error`` (one line, after ``prefix``) unless it is JSON of an attnres
    model."""
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise error(f"{prefix}{ckpt / 'config.json'} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict) or config.get("model_type") != "attnres":
        mt = config.get("model_type") if isinstance(config, dict) else None
        raise error(f"{prefix}{ckpt} holds a {mt!r} model, not an attnres model (model_type 'attnres')")
    return config


def load_pretrained(path: str | Path):
    """(model, tokenizer, train_config dict or None) from a checkpoint or run directory, validated."""
    from transformers import PreTrainedTokenizerFast

    ckpt = resolve_checkpoint_dir(path)
    attnres_config_json(ckpt)
    model = load_model(ckpt)
    if not (ckpt / "tokenizer.json").exists():
        raise CheckpointError(f"{ckpt} has no tokenizer.json")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load the tokenizer in {ckpt}: {str(e).splitlines()[0]}") from None
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(
            f"tokenizer/model vocab mismatch in {ckpt}: the tokenizer has {len(tokenizer)} tokens, "
            f"the model's vocab_size is {model.config.vocab_size}"
        )
    train_config = None
    if (ckpt / CONFIG_FILE).exists():
        try:
            train_config = json.loads((ckpt / CONFIG_FILE).read_text())
        except ValueError as e:
            raise CheckpointError(f"{ckpt / CONFIG_FILE} is not valid JSON: {e}") from None
    return model.eval(), tokenizer, train_config
