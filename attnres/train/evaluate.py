"""Validation loss, perplexity and bits per byte.

Bits per byte is ``loss_nats * n_tokens / (ln 2 * n_bytes)`` over the windows evaluated. The bytes
of exactly those windows are not tracked, so ``n_bytes`` is estimated as ``n_tokens`` times the
split's average UTF-8 bytes per token (``split_bytes / split_tokens``). With every window evaluated
this is exact up to the few tokens at the end that do not fill a window.
"""

from __future__ import annotations

import contextlib
import math

import torch


def autocast(device: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def bits_per_byte(loss: float, n_tokens: int, n_bytes: float) -> float:
    return loss * n_tokens / (math.log(2) * n_bytes)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def evaluate(
    model,
    tokens,
    seq_len: int,
    batch_size: int,
    *,
    split_bytes: int,
    max_batches: int | None = None,
    bf16: bool = False,
    device: str = "cpu",
) -> dict[str, float]:
    """``{"loss", "ppl", "bpb", "tokens"}`` of ``model`` over ``eval_windows(tokens, seq_len, batch_size,
    max_batches)`` (:func:`evaluate_loss`), in eval mode.

    ``tokens`` counts predicted tokens (each window of T tokens predicts T - 1 of them).
    """

    def loss_of(window: torch.Tensor) -> torch.Tensor:
        with autocast(device, bf16):
            return model(window, labels=window, use_cache=False).loss

    was_training = model.training
    model.eval()
    try:
        return evaluate_loss(loss_of, tokens, seq_len, batch_size, split_bytes=split_bytes,
                             max_batches=max_batches, device=device)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_loss(loss_of, tokens, seq_len: int, batch_size: int, *, split_bytes: int,
                  max_batches: int | None = None, device: str = "cpu") -> dict[str, float]:
    """:func:`evaluate` with the forward given: ``loss_of(window)`` is the mean next-token loss of one
    batch of windows (on ``device``), a tensor read once per batch."""
    from ..data import eval_windows

    total, n = 0.0, 0
    for window in eval_windows(tokens, seq_len, batch_size, max_batches=max_batches or None):
        window = window.to(device)
        loss = loss_of(window)
        count = window[:, 1:].numel()
        total += loss.item() * count
        n += count
    if n == 0:
        raise ValueError(
            f"no evaluation windows: {len(tokens)} tokens are fewer than one sequence of {seq_len}"
        )
    loss = total / n
    bytes_per_token = split_bytes / max(1, len(tokens))
    return {
        "loss": loss,
        "ppl": perplexity(loss),
        "bpb": bits_per_byte(loss, n, n * bytes_per_token),
        "tokens": n,
    }
