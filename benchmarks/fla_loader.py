"""Load fla's reference AttnRes (``fla/ops/attnres/naive.py``) by path, without importing the fla package.

fla's package import pulls in Triton (CUDA only), so the benchmark fetches the source distribution with
pip (``pip download --no-deps --no-binary :all:``), extracts only ``naive.py`` and executes that one file.
Since the 0.3 split the ops live in ``fla-core``; ``flash-linear-attention`` is tried first (as named in
the docs) and ``fla-core`` when its archive has no ``fla/ops``. ``naive.py`` needs ``einops``; if it is
not importable, einops' pure-Python wheel is downloaded into the cache and put on ``sys.path`` (nothing is
installed into the environment). Any failure is reported as a reason, never papered over.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

NAIVE_MEMBER = "fla/ops/attnres/naive.py"
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache" / "fla"
PACKAGES = ("flash-linear-attention", "fla-core")


@dataclass
class Loaded:
    fn: object | None = None
    reason: str = ""
    info: dict = field(default_factory=dict)


def _pip_download(args: list[str], dest: Path, timeout: float) -> str | None:
    """Run ``pip download``; return an error string or None."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(cmd[2:])}: {type(e).__name__}: {e}"
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return f"{' '.join(cmd[2:])} failed: {tail[0]}"
    return None


def _archives(cache: Path, package: str) -> list[Path]:
    stem = package.replace("-", "_")
    return sorted(p for p in cache.glob(f"{stem}-*") if p.suffix in (".gz", ".whl", ".zip"))


def _extract_naive(archive: Path, cache: Path) -> Path | None:
    """Extract fla/ops/attnres/naive.py from an sdist or wheel; None if the archive has none."""
    out = cache / "extracted" / archive.name / NAIVE_MEMBER
    if out.exists():
        return out
    data = None
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if m.name.endswith("/" + NAIVE_MEMBER) or m.name == NAIVE_MEMBER:
                    data = tf.extractfile(m).read()
                    break
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.endswith("/" + NAIVE_MEMBER) or name == NAIVE_MEMBER:
                    data = zf.read(name)
                    break
    if data is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def _find_naive(cache: Path, download: bool, timeout: float, notes: list[str]) -> tuple[Path, Path] | None:
    for package in PACKAGES:
        archives = _archives(cache, package)
        if not archives and download:
            err = _pip_download(["--no-binary", ":all:", package], cache, timeout)
            if err:
                notes.append(err)
                err = _pip_download(["--only-binary", ":all:", package], cache, timeout)
                if err:
                    notes.append(err)
            archives = _archives(cache, package)
        for archive in reversed(archives):  # newest name last in sort order
            path = _extract_naive(archive, cache)
            if path is not None:
                return archive, path
            notes.append(f"{archive.name} has no {NAIVE_MEMBER}")
    return None


def _ensure_einops(cache: Path, download: bool, timeout: float, notes: list[str]) -> str | None:
    """Make ``import einops`` work (from the cache if need be); return an error string or None."""
    try:
        import einops  # noqa: F401

        return None
    except ImportError:
        pass
    wheels = sorted(cache.glob("einops-*.whl"))
    if not wheels and download:
        err = _pip_download(["--only-binary", ":all:", "einops"], cache, timeout)
        if err:
            notes.append(err)
        wheels = sorted(cache.glob("einops-*.whl"))
    if not wheels:
        return "fla's naive.py imports einops, which is not installed and could not be fetched"
    sys.path.append(str(wheels[-1]))  # a pure-Python wheel is importable as a zip
    try:
        import einops  # noqa: F401
    except ImportError as e:
        return f"einops from {wheels[-1].name} does not import: {e}"
    notes.append(f"einops imported from {wheels[-1].name} (cache, not installed)")
    return None


def load_fla_naive(cache: Path = DEFAULT_CACHE, download: bool = True, timeout: float = 180.0) -> Loaded:
    """fla's ``naive_attnres`` loaded by path, or the reason it is unavailable."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    found = _find_naive(cache, download, timeout, notes)
    if found is None:
        why = "no fla archive with fla/ops/attnres/naive.py in the cache" + ("" if download else " (download off)")
        return Loaded(reason="; ".join([why, *notes]), info={"cache": str(cache)})
    archive, path = found
    info = {"archive": archive.name, "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    err = _ensure_einops(cache, download, timeout, notes)
    if err:
        return Loaded(reason="; ".join([err, *notes]), info=info)
    try:
        spec = importlib.util.spec_from_file_location("_bench_fla_attnres_naive", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fn = mod.naive_attnres
    except Exception as e:  # report any failure of third-party code as a reason
        return Loaded(reason=f"executing {path} failed: {type(e).__name__}: {e}", info=info)
    info["notes"] = notes
    return Loaded(fn=fn, info=info)


def load_fla_fused(cache: Path = DEFAULT_CACHE) -> Loaded:
    """fla's Triton ``fused_attnres`` (GPU only): from an installed fla, else from the extracted sdist."""
    import torch

    if not torch.cuda.is_available():
        return Loaded(reason="no CUDA device (fla's fused_attnres is a Triton kernel)")
    try:
        from fla.ops.attnres import fused_attnres

        return Loaded(fn=fused_attnres, info={"source": "installed fla"})
    except Exception as e:
        first = f"import fla.ops.attnres: {type(e).__name__}: {e}"
    for archive in reversed(_archives(Path(cache), "fla-core")):
        root = Path(cache) / "src" / archive.name
        if not root.exists() and archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as tf:
                tf.extractall(root, filter="data")
        tops = [p for p in root.glob("*") if (p / "fla").is_dir()] if root.exists() else []
        if not tops:
            continue
        sys.path.insert(0, str(tops[0]))
        try:
            for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
                del sys.modules[name]
            from fla.ops.attnres import fused_attnres

            return Loaded(fn=fused_attnres, info={"source": str(tops[0])})
        except Exception as e:
            return Loaded(reason=f"{first}; from {tops[0]}: {type(e).__name__}: {e}")
    return Loaded(reason=first)
