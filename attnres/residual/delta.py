"""Delta Attention Residuals (Luo, Cai, Hu, arXiv 2605.18855; code wdlctc/delta-attention-residuals-code).

*Additive* routing: the standard residual sum s_l (kept as is) plus a softmax mixture over depth,
``h_l = s_l + g_l * sum_i alpha_{i->l} v_i``, alpha_{i->l} = softmax_i(w_l . RMSNorm(v_i) * gain), over the
sources of Full AttnRes, v_0 = the embedding and v_i = the output of sublayer i (the "deltas"
h_{i+1} - h_i); Full/Block AttnRes instead *replace* the sum by the mixture. Read as in the authors'
``modeling_qwen3_attnres.py`` (``attnres_mode="delta"``, ``delta_attn_res``): the first read (one source)
adds nothing, and the final output is the plain sum (no final routing). Each read point j >= 1 owns
``pseudo_query`` (0), ``key_norm_weight`` (1) and, with ``delta_gate="scalar"``, ``gate`` (0).

``delta_gate``: ``"scalar"`` (default) multiplies the mixture by a zero-init learned scalar g_l, so a
fresh model is the standard residual exactly, bit for bit (an identity at zero init, which is what lets a
pretrained PreNorm checkpoint be converted by fine-tuning); it is the authors'
``attnres_gate_type="learnable_alpha"`` ((1 - a) s + a (s + mix) = s + a mix). ``"none"`` is their default
from-scratch setting (g = 1): at zero init the weights are uniform and the sources sum to s, so
h = s + s / n = (1 + 1/n) s, the standard residual up to a scale that the PreNorm removes (exactly only as
eps -> 0; the same argument as Full AttnRes at zero init).

State: ``(s, v_0, ..., v_j)``. One layout in every mode; the mixture is the library's AttnRes read.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops._checks import compute_dtype, source_dtype
from ..ops.attn_res import read as attn_read
from .base import DepthQuery, Pass, ResidualScheme, State
from .keys import Key, ModelDims


class DeltaQuery(DepthQuery):
    """A DepthQuery (``pseudo_query`` 0, ``key_norm_weight`` 1) plus the mixture's ``gate`` [1] (0)."""

    def __init__(self, hidden_size: int, gate: bool):
        super().__init__(hidden_size)
        self.gate = nn.Parameter(torch.zeros(1, dtype=torch.float32)) if gate else None

    def reset_parameters(self, std: float = 0.02) -> None:
        super().reset_parameters(std)
        if self.gate is not None:
            nn.init.zeros_(self.gate)


class DeltaAttnRes(ResidualScheme):
    name = "delta"
    uses_read_kernel = True
    keys = (
        Key("delta_gate", "scalar", "'scalar': h = s + g * mix with a zero-init scalar g per read point "
            "(standard exactly at step 0); 'none': h = s + mix (the authors' from-scratch default; standard up "
            "to the PreNorm's scale at step 0)", kind="choice", choices=("scalar", "none")),
    )

    def __init__(self, num_sublayers: int, eps: float = 1e-6, delta_gate: str = "scalar"):
        super().__init__(num_sublayers, eps)
        self.gate = self.keys[0].validate(delta_gate) == "scalar"

    @classmethod
    def build(cls, dims: ModelDims, options: dict) -> DeltaAttnRes:
        return cls(dims.num_sublayers, dims.eps, **options)

    def read_params(self, j: int, hidden_size: int) -> nn.Module | None:
        return DeltaQuery(hidden_size, self.gate) if 0 < j < self.num_sublayers else None

    def start(self, embedding: Tensor, ctx: Pass) -> State:
        return (embedding, embedding)

    def read(self, state: State, j: int, query: DeltaQuery | None, norm: nn.Module, ctx: Pass, plan=None) -> Tensor:
        self._check_read(j)
        h, p = state[0], None
        if query is not None:
            sources = state[1:]
            mix, p = attn_read(query(compute_dtype(source_dtype(sources))), None, self.eps, sources)
            h = h + (mix if query.gate is None else query.gate.to(mix.dtype) * mix)
        self._record(ctx, j, h, p)
        return norm(h)

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params=None, scores=None) -> State:
        return (state[0] + out, *state[1:], out)

    def finish(self, state: State, query, norm: nn.Module, ctx: Pass) -> Tensor:
        self._record(ctx, self.num_sublayers, state[0])
        return norm(state[0])

    def __repr__(self) -> str:
        return f"DeltaAttnRes(num_sublayers={self.num_sublayers}, gate={'scalar' if self.gate else 'none'})"
