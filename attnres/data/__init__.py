"""Data layer: corpus assembly, tokenizers, uint16 token files, batches.

>>> data = prepare_data("data", sources=("shakespeare",), tokenizer="bpe", vocab_size=8192)
>>> batches = Batches(data.train, batch_size=32, seq_len=256, seed=0)
>>> ids = batches.get(step)                    # [32, 256] LongTensor; model(ids, labels=ids)
>>> for ids in eval_windows(data.val, seq_len=256, batch_size=32): ...

See :mod:`attnres.data.prepare` for the cache layout and the split rule, and
:mod:`attnres.data.sources` for the source specs.
"""

from .batches import Batches, eval_windows
from .prepare import TokenData, prepare_data, split_documents
from .sources import strip_gutenberg
from .tokenizer import EOS_TOKEN, byte_tokenizer, encode_text, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "EOS_TOKEN",
    "Batches",
    "TokenData",
    "byte_tokenizer",
    "encode_text",
    "eval_windows",
    "load_tokenizer",
    "prepare_data",
    "split_documents",
    "strip_gutenberg",
    "train_bpe_tokenizer",
]
