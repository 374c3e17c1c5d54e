"""Tokenizers: byte-level (no training), byte-level BPE trained with HF ``tokenizers``, or a pretrained
model's own (``pretrained``: a directory with its ``tokenizer.json``, e.g. ``attnres upcycle``'s output).

All are ``transformers.PreTrainedTokenizerFast`` objects, saved with ``save_pretrained`` and loaded with
:func:`load_tokenizer` (or ``AutoTokenizer``). Byte and BPE have eos token ``<|endoftext|>``; a pretrained
tokenizer keeps its own eos token (SmolLM2-135M-Instruct's: ``<|im_end|>``, id 2).

- ``byte``: token id == byte value (0..255), ``<|endoftext|>`` = 256; vocab 257. Exact round trip
  ``decode(encode(text)) == text`` for any Unicode text.
- ``bpe``: GPT-2-style byte-level BPE (ByteLevel pre-tokenizer, no prefix space), 256 byte tokens
  plus merges, ``<|endoftext|>`` = 0. Also round-trips exactly (byte-level, no normalizer,
  ``clean_up_tokenization_spaces=False``).

:func:`encode_text` encodes *ordinary* text: a literal ``"<|endoftext|>"`` inside a document is
encoded as its bytes, never as the eos id, so document boundaries come only from the data layer.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_KINDS = ("byte", "bpe", "pretrained")
BYTE_VOCAB_SIZE = 257           # 256 bytes + <|endoftext|>
MAX_VOCAB_SIZE = 65536          # token ids must fit in uint16 (max id 65535)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable Unicode characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _wrap(tk: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=EOS_TOKEN, clean_up_tokenization_spaces=False
    )


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer, no training: id == byte value, ``<|endoftext|>`` = 256."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab[EOS_TOKEN] = 256
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([EOS_TOKEN])
    return _wrap(tk)


def check_vocab_size(vocab_size: int) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
            or not BYTE_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an int in [{BYTE_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (256 bytes + <|endoftext|>; "
            f"ids must fit in uint16), got {vocab_size!r}"
        )
    return int(vocab_size)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (the train split's documents only).

    The result may have fewer than ``vocab_size`` tokens when the text has too few distinct pairs.
    """
    vocab_size = check_vocab_size(vocab_size)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return _wrap(tk)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> list[str]:
    """``save_pretrained`` into a temp dir, then move each file into ``directory`` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as tmp:
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, directory / f.name)
            names.append(f.name)
    return names


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by this module (a directory, or its ``tokenizer.json``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {str(path)!r}")
    if path.is_file():
        if (path.parent / "tokenizer_config.json").is_file():
            path = path.parent
        else:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path), clean_up_tokenization_spaces=False)
            if EOS_TOKEN in tok.get_vocab():
                tok.eos_token = EOS_TOKEN
            return tok
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in tokenizer directory {str(path)!r}")
    return PreTrainedTokenizerFast.from_pretrained(str(path), clean_up_tokenization_spaces=False)


def pretrained_tokenizer(path: str | Path) -> tuple[PreTrainedTokenizerFast, str]:
    """The tokenizer saved in directory ``path`` and the sha256 of its ``tokenizer.json`` (its identity);
    a ``ValueError`` when it has no eos token or its ids do not fit the uint16 token files."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {str(path)!r} (a pretrained tokenizer is a directory "
                                "with the fast tokenizer's tokenizer.json, as save_pretrained writes it)")
    try:
        tok = load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - a corrupt tokenizer file surfaces as many exception types
        raise ValueError(f"cannot load the tokenizer in {str(path)!r}: {(str(e).splitlines() or [''])[0]}") from None
    if len(tok) > MAX_VOCAB_SIZE:
        raise ValueError(f"the tokenizer in {str(path)!r} has {len(tok):,} tokens; token files are uint16, so at "
                         f"most {MAX_VOCAB_SIZE:,} fit")
    if tok.eos_token is None or tok.eos_token_id is None:
        raise ValueError(f"the tokenizer in {str(path)!r} has no eos token (documents are separated by it)")
    from ._io import sha256_file

    return tok, sha256_file(path / "tokenizer.json")


def _encode_many(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    backend = tokenizer.backend_tokenizer
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True  # a literal "<|endoftext|>" in the text is just text
    try:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = before


def _as_uint16(ids: list[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.max() >= MAX_VOCAB_SIZE or arr.min() < 0):
        bad = int(arr.max()) if arr.max() >= MAX_VOCAB_SIZE else int(arr.min())
        raise ValueError(f"token id {bad} does not fit in uint16 (vocab must be <= {MAX_VOCAB_SIZE})")
    return arr.astype(np.uint16)


def encode_text(tokenizer: PreTrainedTokenizerFast, text: str) -> np.ndarray:
    """uint16 token ids of ``text``: no BOS/EOS added, special-token strings encoded as plain text."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _as_uint16(_encode_many(tokenizer, [text])[0])
