"""Hyper-Connections (ZOO.md §2.1; arXiv 2409.19606, lucidrains ``hyper_connections.py``).

The residual is n streams H in R^{n x D} per token (``hyper_streams``), all the embedding at the start.
Per sublayer, with H_bar = RMSNorm(H) per stream (no gain):

- A_m = s_a tanh(H_bar W_m) + A_m0 (n), the input weights: x = A_m^T H, and ``read`` returns norm(x);
- A_r = s_a tanh(H_bar W_r) + A_r0 (n x n), B = s_b tanh(H_bar W_b)^T + B0 (1 x n), the update:
  H'_s = sum_t A_r[t, s] H_t + B[s] f(norm(x)).

Init: W_m, W_r, W_b = 0, s_a = s_b = 0.01, A_m0 = e_{j mod n}, A_r0 = I, B0 = 1, so every stream carries the
standard residual sum and a fresh model equals ``standard`` (its output, the sum of the streams, is n times
the standard one, which the final RMSNorm removes up to eps). ``hc_h_res="identity"`` fixes A_r = I.

Parameters of read point j < L (``layers.{i}.attn_res`` / ``mlp_res``): ``w_pre`` [D], ``w_res`` [n, D],
``w_post`` [D], ``static_pre`` [n], ``static_res`` [n * n] (row-major A_r0; 1-D, so, like every static
vector here, not weight-decayed toward 0), ``static_post`` [n], ``scale_alpha`` [1],
``scale_beta`` [1], fp32. ``write`` recomputes the coefficients from the same H as its ``read`` (the scheme
keeps no per-forward state; the projections are O(nD) per token). State: ``(H,)``, ``H`` ``[n, ..., D]``;
one layout in every mode; the final output is norm(sum of the streams).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._checks import compute_dtype
from .base import Pass, ResidualParams, ResidualScheme, State, init_copy_
from .keys import Key, ModelDims

STREAMS = Key("hyper_streams", 4, "n, the number of residual streams (expansion rate)", unit="streams", minimum=1)


class HyperParams(ResidualParams):
    """One sublayer's HC parameters (module docstring)."""

    def __init__(self, hidden_size: int, streams: int, j: int, free_res: bool):
        super().__init__()
        n, d = streams, hidden_size
        self.streams, self.j = n, j
        self.w_pre = nn.Parameter(torch.zeros(d))
        self.w_post = nn.Parameter(torch.zeros(d))
        self.static_pre = nn.Parameter(torch.zeros(n))
        self.static_post = nn.Parameter(torch.zeros(n))
        if free_res:
            self.w_res = nn.Parameter(torch.zeros(n, d))
            self.static_res = nn.Parameter(torch.zeros(n * n))
        self.scale_alpha = nn.Parameter(torch.zeros(1))
        self.scale_beta = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        n = self.streams
        for p in (self.w_pre, self.w_post) + ((self.w_res,) if hasattr(self, "w_res") else ()):
            nn.init.zeros_(p)
        init_copy_(self.static_pre, F.one_hot(torch.tensor(self.j % n), n).float())
        nn.init.ones_(self.static_post)
        if hasattr(self, "static_res"):
            init_copy_(self.static_res, torch.eye(n).flatten())
        nn.init.constant_(self.scale_alpha, 0.01)
        nn.init.constant_(self.scale_beta, 0.01)

    def extra_repr(self) -> str:
        return f"streams={self.streams}, hidden_size={self.w_pre.shape[0]}"


class HyperConnections(ResidualScheme):
    name = "hc"
    keys = (
        STREAMS,
        Key("hc_h_res", "free", "the stream mixing A_r: 'free' (learned, dynamic) or 'identity'", kind="choice",
            choices=("free", "identity")),
    )

    def __init__(self, num_sublayers: int, eps: float = 1e-6, hyper_streams: int = 4, hc_h_res: str = "free"):
        super().__init__(num_sublayers, eps)
        self.streams = self.keys[0].validate(hyper_streams)
        self.free_res = self.keys[1].validate(hc_h_res) == "free"

    @classmethod
    def build(cls, dims: ModelDims, options: dict) -> HyperConnections:
        return cls(dims.num_sublayers, dims.eps, **options)

    def read_params(self, j: int, hidden_size: int) -> nn.Module | None:
        return HyperParams(hidden_size, self.streams, j, self.free_res) if j < self.num_sublayers else None

    def start(self, embedding: Tensor, ctx: Pass) -> State:
        return (embedding.unsqueeze(0).expand(self.streams, *embedding.shape),)

    def _normed(self, H: Tensor) -> tuple[Tensor, Tensor]:
        ct = compute_dtype(H.dtype)
        h = H.to(ct)
        return h, F.rms_norm(h, (h.shape[-1],), eps=self.eps)

    @staticmethod
    def _col(x: Tensor, like: Tensor) -> Tensor:
        """A per-stream vector [n] shaped to broadcast against [n, ..., ...] of ``like``'s rank."""
        return x.reshape(x.shape[0], *[1] * (like.dim() - 1))

    def read(self, state: State, j: int, params: HyperParams, norm: nn.Module, ctx: Pass, plan=None) -> Tensor:
        self._check_read(j)
        H = state[0]
        h, hbar = self._normed(H)
        ct = h.dtype
        a_m = params.scale_alpha.to(ct) * torch.tanh(hbar @ params.w_pre.to(ct))  # [n, ...]
        a_m = a_m + self._col(params.static_pre.to(ct), a_m)
        x = (a_m.unsqueeze(-1) * h).sum(0).to(H.dtype)
        self._record(ctx, j, x)
        return norm(x)

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params: HyperParams = None, scores=None) -> State:
        H = state[0]
        h, hbar = self._normed(H)
        ct = h.dtype
        b = params.scale_beta.to(ct) * torch.tanh(hbar @ params.w_post.to(ct))  # [n(s), ...]
        b = b + self._col(params.static_post.to(ct), b)
        if self.free_res:
            a_r = params.scale_alpha.to(ct) * torch.tanh(hbar @ params.w_res.to(ct).T)  # [n(t), ..., n(s)]
            a_r = a_r + params.static_res.to(ct).reshape(a_r.shape[0], *[1] * (a_r.dim() - 2), a_r.shape[-1])  # [t, s]
            mixed = torch.einsum("t...s,t...d->s...d", a_r, h)
        else:
            mixed = h
        return ((mixed + b.unsqueeze(-1) * out.to(ct).unsqueeze(0)).to(H.dtype),)

    def finish(self, state: State, query, norm: nn.Module, ctx: Pass) -> Tensor:
        h = state[0].sum(0)
        self._record(ctx, self.num_sublayers, h)
        return norm(h)

    def __repr__(self) -> str:
        return (f"HyperConnections(num_sublayers={self.num_sublayers}, streams={self.streams}, "
                f"h_res={'free' if self.free_res else 'identity'})")
