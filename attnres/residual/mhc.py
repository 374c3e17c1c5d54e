"""mHC: manifold-constrained Hyper-Connections (ZOO.md §2.2; DeepSeek, arXiv 2512.24880), Table 4's "mHC".

n streams H (``hyper_streams``) as HC. Per sublayer, from x' = RMSNorm(vec(H)) over all n*D (gain ``norm_weight``):
H_pre = sigmoid(a_pre x' phi_pre + b_pre), H_post = 2 sigmoid(a_post x' phi_post + b_post) and
H_res = SinkhornKnopp(a_res mat(x' phi_res) + b_res) (doubly stochastic; ``mhc_sinkhorn_iters`` alternating
column / row normalisations in log space, default 20). ``read`` returns norm(sum_s H_pre[s] H_s); the
update is H'_t = sum_s H_res[t, s] H_s + H_post[t] f. ``mhc_h_res="identity"`` fixes H_res = I (the
"mHC might not need the m" row).

Init (``mhc_init``): ``"paper"`` (default; the mHC-lite authors' reference code ``FFTYYY/mhc-lite``
``hyper_conn/mhc.py``): phi = 0, a = 0.01, b_pre = b_post = +1 on stream k = j mod n and -1 elsewhere,
b_res = 0 on the diagonal and -8 off it; *not* the standard residual at step 0 (the biases mix the streams
~0.73 / 0.27). ``"tb"`` (tokenbender's lucidrains path): b_pre = +8 / -8, b_post = 0 (H_post = 1),
b_res = +8 / -8 with Sinkhorn on logits / 0.05: close to ``standard`` (with n = 1 and
``mhc_h_res="identity"``, the standard residual up to the PreNorm's eps).

Parameters of read point j < L: ``norm_weight`` [nD], ``phi_pre``/``phi_post`` [n, nD], ``phi_res``
[n^2, nD] (mHC-lite: [n!, nD]), ``b_pre``/``b_post`` [n], ``b_res`` [n * n] row-major (mHC-lite: [n!]; 1-D,
so not weight-decayed toward 0),
``alpha_pre``/``alpha_post``/``alpha_res`` [1], fp32. ``write`` recomputes the coefficients from the same
H as its ``read``. State ``(H,)``, ``[n, ..., D]``; one layout in every mode; output norm(sum of streams).
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._checks import compute_dtype
from .base import Pass, ResidualParams, ResidualScheme, State, init_copy_
from .hc import STREAMS
from .keys import Key, ModelDims

INIT = Key("mhc_init", "paper", "bias init: 'paper' (+-1 pre/post, -8 off-diagonal res; the mHC-lite authors' "
           "code) or 'tb' (+-8 pre, 0 post, +-8 res with Sinkhorn temperature 0.05; ~standard at step 0)",
           kind="choice", choices=("paper", "tb"))
TB_TAU = 0.05  # [TB]'s sinkhorn_tau


@lru_cache(maxsize=8)
def permutation_matrices(n: int) -> Tensor:
    """All n! permutation matrices ``[n!, n, n]`` (``itertools.permutations`` order; index 0 is I)."""
    perms = list(itertools.permutations(range(n)))
    out = torch.zeros(len(perms), n, n)
    for r, perm in enumerate(perms):
        out[r, torch.arange(n), torch.tensor(perm)] = 1.0
    return out


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """SinkhornKnopp(exp(logits)) over the last two dims, in log space: columns, then rows, ``iters`` times."""
    m = logits
    for _ in range(iters):
        m = m - torch.logsumexp(m, dim=-2, keepdim=True)
        m = m - torch.logsumexp(m, dim=-1, keepdim=True)
    return m.exp()


class ManifoldParams(ResidualParams):
    """One sublayer's mHC / mHC-lite parameters (module docstring). ``h_res``: sinkhorn, birkhoff or identity."""

    def __init__(self, hidden_size: int, streams: int, j: int, h_res: str, init: str):
        super().__init__()
        n, nd = streams, streams * hidden_size
        self.streams, self.j, self.h_res, self.init = n, j, h_res, init
        self.norm_weight = nn.Parameter(torch.ones(nd))
        self.phi_pre = nn.Parameter(torch.zeros(n, nd))
        self.phi_post = nn.Parameter(torch.zeros(n, nd))
        self.b_pre = nn.Parameter(torch.zeros(n))
        self.b_post = nn.Parameter(torch.zeros(n))
        self.alpha_pre = nn.Parameter(torch.zeros(1))
        self.alpha_post = nn.Parameter(torch.zeros(1))
        if h_res != "identity":
            rows = n * n if h_res == "sinkhorn" else math.factorial(n)
            self.phi_res = nn.Parameter(torch.zeros(rows, nd))
            self.b_res = nn.Parameter(torch.zeros(rows))
            self.alpha_res = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        n, tb = self.streams, self.init == "tb"
        nn.init.ones_(self.norm_weight)
        onehot = F.one_hot(torch.tensor(self.j % n), n).float()
        init_copy_(self.b_pre, (onehot * 2 - 1) * (8.0 if tb else 1.0))
        init_copy_(self.b_post, torch.zeros(n) if tb else onehot * 2 - 1)
        for p in (self.phi_pre, self.phi_post):
            nn.init.zeros_(p)
        for p in (self.alpha_pre, self.alpha_post):
            nn.init.constant_(p, 0.01)
        if self.h_res == "identity":
            return
        nn.init.zeros_(self.phi_res)
        nn.init.constant_(self.alpha_res, 0.01)
        if self.h_res == "sinkhorn":
            eye = torch.eye(n)
            init_copy_(self.b_res, (eye * 8.0 - (1 - eye) * 8.0 if tb else -(1 - eye) * 8.0).flatten())
        else:  # birkhoff: 0 for the identity permutation, -8 for the others
            init_copy_(self.b_res, torch.cat([torch.zeros(1), torch.full((self.b_res.shape[0] - 1,), -8.0)]))

    def extra_repr(self) -> str:
        return f"streams={self.streams}, h_res={self.h_res!r}, init={self.init!r}"


class ManifoldHyperConnections(ResidualScheme):
    name = "mhc"
    keys = (
        STREAMS,
        Key("mhc_h_res", "sinkhorn", "the stream mixing H_res: 'sinkhorn' (doubly stochastic) or 'identity'",
            kind="choice", choices=("sinkhorn", "identity")),
        INIT,
        Key("mhc_sinkhorn_iters", 20, "Sinkhorn-Knopp iterations (t_max; mHC Table 5: 20)", unit="iterations",
            minimum=1),
    )

    def __init__(self, num_sublayers: int, eps: float = 1e-6, hyper_streams: int = 4, mhc_h_res: str = "sinkhorn",
                 mhc_init: str = "paper", mhc_sinkhorn_iters: int = 20):
        super().__init__(num_sublayers, eps)
        keys = dict(zip(("n", "h_res", "init", "iters"), self.keys, strict=True))
        self._setup(keys["n"].validate(hyper_streams), keys["h_res"].validate(mhc_h_res),
                    keys["init"].validate(mhc_init), keys["iters"].validate(mhc_sinkhorn_iters))

    def _setup(self, streams: int, h_res: str, init: str, iters: int) -> None:
        self.streams, self.h_res, self.init, self.iters = streams, h_res, init, iters

    @classmethod
    def build(cls, dims: ModelDims, options: dict):
        return cls(dims.num_sublayers, dims.eps, **options)

    def read_params(self, j: int, hidden_size: int) -> nn.Module | None:
        if j == self.num_sublayers:
            return None
        return ManifoldParams(hidden_size, self.streams, j, self.h_res, self.init)

    def start(self, embedding: Tensor, ctx: Pass) -> State:
        return (embedding.unsqueeze(0).expand(self.streams, *embedding.shape),)

    def _coefficients(self, H: Tensor, p: ManifoldParams, which: str) -> tuple[Tensor, ...]:
        """H in the compute dtype, then H_pre ``[..., n]`` (``which="pre"``) or H_post ``[..., n]`` and
        H_res ``[..., n, n]`` / None (``which="post"``)."""
        ct = compute_dtype(H.dtype)
        h = H.to(ct)
        flat = h.movedim(0, -2).flatten(-2)  # [..., n * D], streams concatenated
        x = F.rms_norm(flat, (flat.shape[-1],), p.norm_weight.to(ct), self.eps)
        if which == "pre":
            return h, torch.sigmoid(p.alpha_pre.to(ct) * F.linear(x, p.phi_pre.to(ct)) + p.b_pre.to(ct))
        post = 2 * torch.sigmoid(p.alpha_post.to(ct) * F.linear(x, p.phi_post.to(ct)) + p.b_post.to(ct))
        if self.h_res == "identity":
            return h, post, None
        logits = p.alpha_res.to(ct) * F.linear(x, p.phi_res.to(ct))
        if self.h_res == "sinkhorn":
            logits = (logits + p.b_res.to(ct)).unflatten(-1, (self.streams, self.streams))
            return h, post, sinkhorn(logits / (TB_TAU if self.init == "tb" else 1.0), self.iters)
        a = torch.softmax(logits + p.b_res.to(ct), dim=-1)  # [..., n!]
        return h, post, torch.einsum("...r,rts->...ts", a, permutation_matrices(self.streams).to(a))

    def read(self, state: State, j: int, params: ManifoldParams, norm: nn.Module, ctx: Pass, plan=None) -> Tensor:
        self._check_read(j)
        H = state[0]
        h, pre = self._coefficients(H, params, "pre")
        x = torch.einsum("...s,s...d->...d", pre, h).to(H.dtype)
        self._record(ctx, j, x)
        return norm(x)

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params: ManifoldParams = None,
              scores=None) -> State:
        H = state[0]
        h, post, res = self._coefficients(H, params, "post")
        mixed = h if res is None else torch.einsum("...ts,s...d->t...d", res, h)
        new = mixed + post.movedim(-1, 0).unsqueeze(-1) * out.to(h.dtype).unsqueeze(0)
        return (new.to(H.dtype),)

    def finish(self, state: State, query, norm: nn.Module, ctx: Pass) -> Tensor:
        h = state[0].sum(0)
        self._record(ctx, self.num_sublayers, h)
        return norm(h)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_sublayers={self.num_sublayers}, streams={self.streams}, "
                f"h_res={self.h_res!r}, init={self.init!r})")
