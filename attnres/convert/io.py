"""Checkpoint directories for ``attnres convert``: read SRC (config.json + safetensors), write OUT atomically.

OUT holds ``model.safetensors`` and ``config.json`` in the target layout's names (for ``gguf`` that is a
safetensors file with GGUF tensor names and GGUF metadata keys, not a .gguf file). Everything is read and
converted before anything is written; OUT appears complete (a temporary directory renamed into place) or
not at all, and an existing OUT is replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import Tensor

from .errors import ConvertError
from .state_dict import convert

WEIGHTS, CONFIG, INDEX = "model.safetensors", "config.json", "model.safetensors.index.json"


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        try:
            return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConvertError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    return sorted(path.glob("*.safetensors"))


def _read_config(path: Path) -> dict:
    file = path / CONFIG
    if not file.is_file():
        raise ConvertError(f"{path} has no {CONFIG}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{file}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{file}: not a JSON object")
    return config


def read_checkpoint(src: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(state dict, config.json) of a checkpoint directory."""
    from safetensors.torch import load_file

    path = Path(src)
    if not path.is_dir():
        raise ConvertError(f"{src} is not a directory")
    config, files = _read_config(path), _weight_files(path)
    if not files:
        raise ConvertError(f"{src} has no *.safetensors weights")
    state_dict: dict[str, Tensor] = {}
    for file in files:
        try:
            part = load_file(str(file))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
            raise ConvertError(f"{file}: not a readable safetensors file ({' '.join(str(e).split())})") from None
        twice = sorted(set(part) & set(state_dict))
        if twice:
            raise ConvertError(f"{file}: {twice[0]} is also in another weight file")
        state_dict.update(part)
    return state_dict, config


def _unshared(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, none sharing storage (safetensors refuses aliases)."""
    seen, out = set(), {}
    for key, t in state_dict.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def _check_out(out: Path, overwrite: bool, src: Path | None = None) -> None:
    if src is not None and out.resolve() == src.resolve():
        raise ConvertError(f"--out {out} is the source directory; write elsewhere")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} exists; give --overwrite to replace it")


def write_checkpoint(out: str | os.PathLike, state_dict: dict[str, Tensor], config: dict,
                     overwrite: bool = False) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``out``, atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    _check_out(out, overwrite)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"  # a config that is not JSON fails before any write
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint gets the umask's mode
        save_file(_unshared(state_dict), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(text)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, source: str, target: str,
                       missing_final: str = "sum", overwrite: bool = False) -> str:
    """Convert the checkpoint in ``src`` from layout ``source`` to ``target`` into ``out``; a summary line."""
    src, out = Path(src), Path(out)
    _check_out(out, overwrite, src)  # before reading anything big
    state_dict, foreign_config = read_checkpoint(src)
    theirs, their_config, config = convert(state_dict, foreign_config, source, target, missing_final)
    write_checkpoint(out, theirs, their_config, overwrite)
    final = config.attn_res_final_aggregation and config.residual != "standard"
    size = f", block size {config.block_size} sublayers" if config.block_size else ""
    return (f"{source} -> {target}: {len(theirs)} tensors, residual {config.residual}{size}, "
            f"final aggregation {'yes' if final else 'no'} -> {out}")
