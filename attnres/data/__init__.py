"""Data layer: corpus assembly, tokenizers, uint16 token files, batches.

>>> data = prepare_data(sources=("shakespeare",), tokenizer="bpe", vocab_size=8192)
>>> batches = Batches(data.train, batch_size=32, seq_len=256, seed=0)
>>> ids = batches.get(step)                    # [32, 256] LongTensor; model(ids, labels=ids)
>>> for ids in eval_windows(data.val, seq_len=256, batch_size=32): ...

``prepare_data``'s cache is :func:`default_data_dir` unless a ``data_dir`` is given: ``$ATTNRES_DATA``,
else ``$XDG_CACHE_HOME/attnres``, else ``~/.cache/attnres`` (absolute, the same from any directory).
See :mod:`attnres.data.prepare` for the cache layout and the split rule, and
:mod:`attnres.data.sources` for the source specs.
"""

from ._io import DATA_DIR_ENV, default_data_dir, resolve_data_dir
from .batches import Batches, eval_windows
from .prepare import TokenData, prepare_data, split_documents
from .sources import strip_gutenberg
from .tokenizer import EOS_TOKEN, byte_tokenizer, encode_text, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "DATA_DIR_ENV",
    "EOS_TOKEN",
    "Batches",
    "TokenData",
    "byte_tokenizer",
    "default_data_dir",
    "encode_text",
    "eval_windows",
    "load_tokenizer",
    "prepare_data",
    "resolve_data_dir",
    "split_documents",
    "strip_gutenberg",
    "train_bpe_tokenizer",
]
