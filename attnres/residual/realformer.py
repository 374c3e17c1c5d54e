"""RealFormer "residual attention" (ZOO.md §4b; google-research ``realformer/realformer.py``).

The standard PreNorm residual, plus a residual on the *token*-attention scores of every attention layer,
per head: with S_l = Q_l K_l^T / sqrt(d_h), attention layer l uses softmax(S_l + P_{l-1} + mask) and passes
P_l = S_l + P_{l-1} on (P_0 = 0; the running sum is carried *before* the mask). ``realformer_running_mean``
uses softmax((S_l + P_{l-1}) / l) (the authors' advice for 30+ layers). No parameters. Under GQA, P is
``[B, query heads, q, kv]``. A name collision with AttnRes, not a reading of it (PAPER §8): AttnRes never
touches token attention.

It is the one scheme that uses the interface's attention hook, :meth:`score_bias`: the state is ``(h,)``
before the first attention and ``(h, P)`` after; attention sublayer j gets P as a bias and hands
S + P back to ``write``. Scores are materialised (SDPA cannot return them): B * heads * q * kv per layer
kept for backward. With a KV cache, P holds the rows of this forward's queries (every layer's scores
for those rows are computed in the same forward), so cached decoding equals recomputation.
"""

from __future__ import annotations

from torch import Tensor

from .base import Pass, ScoreBias, State
from .keys import Key, ModelDims
from .standard import StandardResidual


class RealFormer(StandardResidual):
    name = "realformer"
    keys = (
        Key("realformer_running_mean", False, "attention layer l uses softmax((S_l + P_{l-1}) / l) instead of "
            "softmax(S_l + P_{l-1})", kind="bool"),
    )

    def __init__(self, num_sublayers: int, eps: float = 1e-6, realformer_running_mean: bool = False):
        super().__init__(num_sublayers, eps)
        self.running_mean = self.keys[0].validate(realformer_running_mean)

    @classmethod
    def build(cls, dims: ModelDims, options: dict) -> RealFormer:
        return cls(dims.num_sublayers, dims.eps, **options)

    def score_bias(self, state: State, j: int, ctx: Pass) -> ScoreBias:
        layer = j // 2 + 1  # attention layers count from 1
        return ScoreBias(state[1] if len(state) > 1 else None, 1.0 / layer if self.running_mean else 1.0)

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params=None, scores=None) -> State:
        h = state[0] + out
        if scores is not None:
            return (h, scores)
        return (h, *state[1:])

    def __repr__(self) -> str:
        return f"RealFormer(num_sublayers={self.num_sublayers}, running_mean={self.running_mean})"
