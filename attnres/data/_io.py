"""Small file helpers for the data cache: its location, atomic writes, checksums, a lock, progress lines."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "ATTNRES_DATA"


def default_data_dir() -> Path:
    """The user-level corpus cache, the same whatever the current directory: ``$ATTNRES_DATA`` if set,
    else ``$XDG_CACHE_HOME/attnres`` (an absolute ``XDG_CACHE_HOME`` only, as the XDG spec says), else
    ``~/.cache/attnres``. Always an absolute path."""
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return Path(os.path.abspath(Path(env).expanduser()))
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return Path(os.path.abspath(base / "attnres"))


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir`` as an absolute path (``~`` expanded, relative to the current directory);
    None or ``""``: :func:`default_data_dir`."""
    if data_dir is None or not str(data_dir).strip():
        return default_data_dir()
    return Path(os.path.abspath(Path(data_dir).expanduser()))


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def read_json(path: str | Path) -> Any | None:
    """The parsed JSON at ``path``, or None if it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX flock), so concurrent ranks build a cache entry once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no locking
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def log(progress: bool, message: str) -> None:
    if progress:
        print(f"[attnres.data] {message}", file=sys.stderr, flush=True)
