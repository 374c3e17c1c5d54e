"""Batches of token windows: random training windows (deterministic per step) and eval windows.

Windows are plain ``[B, T]`` token ids; the model shifts for next-token prediction itself
(``model(ids, labels=ids)``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _tokens_1d(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D numpy array, got {type(tokens).__name__} "
                         f"with shape {getattr(tokens, 'shape', None)}")
    if len(tokens) < seq_len:
        raise ValueError(f"text shorter than one sequence: {len(tokens)} tokens < seq_len={seq_len}")
    return tokens


class Batches:
    """Random training windows; batch ``step`` depends only on ``(seed, step)``, so resuming at a step
    reproduces the exact batches an uninterrupted run would have seen.

    ``get(step)`` draws ``batch_size`` window starts uniformly from ``[0, len(tokens) - seq_len]`` with
    ``np.random.default_rng([seed, step])`` and returns ``tokens[start:start + seq_len]`` for each.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.batch_size = _positive("batch_size", batch_size)
        self.seq_len = _positive("seq_len", seq_len)
        self.tokens = _tokens_1d(tokens, self.seq_len)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        self._offsets = np.arange(self.seq_len, dtype=np.int64)

    def starts(self, step: int) -> np.ndarray:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        rng = np.random.default_rng([self.seed, int(step)])
        return rng.integers(0, len(self.tokens) - self.seq_len + 1, size=self.batch_size, dtype=np.int64)

    def get(self, step: int) -> torch.LongTensor:
        idx = self.starts(step)[:, None] + self._offsets[None, :]
        return torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))


def eval_windows(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[torch.LongTensor]:
    """Contiguous non-overlapping ``seq_len`` windows over ``tokens``, in order, ``batch_size`` at a time.

    Covers ``tokens[: (len(tokens) // seq_len) * seq_len]``; the tail shorter than one window is
    dropped. The last batch may hold fewer than ``batch_size`` windows. ``max_batches`` stops early.
    Arguments are checked when called, not on first iteration.
    """
    seq_len = _positive("seq_len", seq_len)
    batch_size = _positive("batch_size", batch_size)
    if max_batches is not None:
        max_batches = _positive("max_batches", max_batches)
    tokens = _tokens_1d(tokens, seq_len)
    n_windows = len(tokens) // seq_len
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)

    def gen() -> Iterator[torch.LongTensor]:
        for b in range(n_batches):
            lo = b * batch_size * seq_len
            hi = min(n_windows, (b + 1) * batch_size) * seq_len
            chunk = np.asarray(tokens[lo:hi], dtype=np.int64).reshape(-1, seq_len)
            yield torch.from_numpy(chunk)

    return gen()
