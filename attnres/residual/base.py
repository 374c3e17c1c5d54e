"""The residual-stream interface every scheme implements (DESIGN.md: read / write / finish).

    stream = scheme.start(embedding)
    for each sublayer f:  stream.write(f(stream.read(f_norm)))
    hidden = stream.finish(final_norm)

``read(norm)`` returns the next sublayer's *normalised* input, so AttnRes schemes can fuse the
PreNorm into the depth read. ``norm`` is any RMSNorm with ``weight`` ([D]) and ``eps``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from ..ops._checks import compute_dtype, source_dtype
from ..ops.attn_res import read


class Norm(Protocol):
    weight: Tensor
    eps: float

    def __call__(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class DepthRead:
    """What one read saw, recorded for analysis (detached).

    ``read`` is the read point: ``2*i`` before decoder layer i's attention, ``2*i + 1`` before its
    MLP, ``num_sublayers`` for the final output. ``hidden_rms`` is the RMS over all tokens of the
    hidden state h_l *before* the PreNorm (PAPER Fig. 5b). For AttnRes reads ``weights`` is
    ``[num_sources, ...]``, row i for source i (Full: 0 = embedding, j = output of sublayer j;
    Block: 0 = embedding, n = block n, completed or partial); None for standard reads and for an
    AttnRes final output without aggregation.
    """

    read: int
    hidden_rms: float
    weights: Tensor | None = None


def rms(x: Tensor) -> float:
    return x.detach().float().pow(2).mean().sqrt().item()


class ResidualStream:
    """State of one forward pass through the residual connections."""

    def read(self, norm: Norm) -> Tensor:
        raise NotImplementedError

    def write(self, out: Tensor) -> None:
        raise NotImplementedError

    def finish(self, norm: Norm) -> Tensor:
        raise NotImplementedError


class ResidualScheme(nn.Module):
    """A residual scheme: owns the parameters, makes one stream per forward pass."""

    name: str = ""

    def __init__(self, hidden_size: int, num_sublayers: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_sublayers = num_sublayers
        self._records: list[DepthRead] | None = None

    def start(self, embedding: Tensor) -> ResidualStream:
        raise NotImplementedError

    @contextlib.contextmanager
    def record(self):
        """Collect a :class:`DepthRead` for every read (and the final output) made inside the block.

        Recording computes extra statistics and syncs; use it for analysis, not for training steps.
        """
        self._records = records = []
        try:
            yield records
        finally:
            self._records = None


class AttnResScheme(ResidualScheme):
    """Shared parameters and mixing for Full and Block AttnRes.

    Read point j has its own pseudo-query ``pseudo_query[j]`` (zero-init, PAPER §5) and key-norm gain
    ``key_norm_weight[j]`` (one-init). Rows 0..L-1 are the sublayer reads; with
    ``final_aggregation`` row L is the final output aggregation. Both are kept in fp32.
    """

    def __init__(self, hidden_size: int, num_sublayers: int, final_aggregation: bool = True):
        super().__init__(hidden_size, num_sublayers)
        self.final_aggregation = final_aggregation
        rows = num_sublayers + int(final_aggregation)
        self.pseudo_query = nn.Parameter(torch.zeros(rows, hidden_size, dtype=torch.float32))
        self.key_norm_weight = nn.Parameter(torch.ones(rows, hidden_size, dtype=torch.float32))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.pseudo_query.zero_()
            self.key_norm_weight.fill_(1.0)

    def mix(self, j: int, sources: list[Tensor], norm: Norm) -> Tensor:
        """Read point j: softmax over ``sources`` (oldest first) fused with ``norm``."""
        if j >= self.num_sublayers:
            raise RuntimeError(f"read point {j} does not exist: the scheme has {self.num_sublayers} sublayers")
        return self._mix(j, sources, norm)

    def final(self, sources: list[Tensor], norm: Norm) -> Tensor:
        """The final output: an AttnRes read over all sources, or their plain sum."""
        if self.final_aggregation:
            return self._mix(self.num_sublayers, sources, norm)
        h = sum(sources[1:], sources[0])
        if self._records is not None:
            self._records.append(DepthRead(self.num_sublayers, rms(h)))
        return norm(h)

    def folded_queries(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        """q' = q * g of read points start..end-1 in ``dtype``, [end - start, D] (the key-norm gain folded in)."""
        return self.pseudo_query[start:end].to(dtype) * self.key_norm_weight[start:end].to(dtype)

    def _mix(self, j: int, sources: list[Tensor], norm: Norm) -> Tensor:
        ct = compute_dtype(source_dtype(sources))
        qp = self.pseudo_query[j].to(ct) * self.key_norm_weight[j].to(ct)  # as attn_res folds the gain
        if self._records is None:
            return read(qp, norm.weight.to(ct), norm.eps, sources)[0]
        h, p = read(qp, None, norm.eps, sources)
        self._records.append(DepthRead(j, rms(h), p.detach()))
        return norm(h)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_sublayers={self.num_sublayers}, " \
               f"final_aggregation={self.final_aggregation}"
