"""A learnable residual scale (ZOO.md §4a): LayerScale, or ReZero with ``shape="scalar"``.

h <- h + lambda_l * f_l(Norm_l(h)), one lambda_l per sublayer (``[D]`` for LayerScale, ``[1]`` for ReZero),
living in the sublayer's module (``layers.{i}.attn_res.gain`` / ``mlp_res.gain``, fp32, 1-D: no weight
decay). The PreNorm and the final norm stay, so only the residual weighting differs from ``standard``
(the original ReZero also drops the norms). One of the misreadings of AttnRes (PAPER §8): a single-state
recurrence (Table 5), not a read over depth. lambda = 1 is ``standard`` exactly.

Init (``residual_scale_init`` None): LayerScale's CaiT rule by depth in decoder layers, 0.1 up to 18,
1e-5 up to 24, 1e-6 deeper (Touvron et al. 2021); ReZero's 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Pass, ResidualParams, State
from .keys import Key, ModelDims
from .standard import StandardResidual


def cait_init(num_layers: int) -> float:
    """LayerScale's epsilon for a model of ``num_layers`` blocks (CaiT)."""
    return 0.1 if num_layers <= 18 else 1e-5 if num_layers <= 24 else 1e-6


class ResidualGain(ResidualParams):
    """lambda_l of one sublayer: ``gain`` [D] or [1], fp32, filled with ``init``."""

    def __init__(self, size: int, init: float):
        super().__init__()
        self.init = init
        self.gain = nn.Parameter(torch.full((size,), init, dtype=torch.float32))

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.constant_(self.gain, self.init)

    def extra_repr(self) -> str:
        return f"size={self.gain.shape[0]}, init={self.init:g}"


class ResidualScale(StandardResidual):
    name = "residual_scale"
    keys = (
        Key("residual_scale_shape", "vector", "'vector': LayerScale, lambda in R^D per sublayer; 'scalar': "
            "ReZero, one lambda per sublayer", kind="choice", choices=("vector", "scalar")),
        Key("residual_scale_init", None, "initial lambda; None: the CaiT rule by depth (0.1 up to 18 decoder "
            "layers, 1e-5 up to 24, 1e-6 deeper) for 'vector', 0 (ReZero) for 'scalar'", kind="float",
            optional=True),
    )

    def __init__(self, num_sublayers: int, eps: float = 1e-6, residual_scale_shape: str = "vector",
                 residual_scale_init: float | None = None):
        super().__init__(num_sublayers, eps)
        self.keys[0].validate(residual_scale_shape)
        self.keys[1].validate(residual_scale_init)
        self.shape = residual_scale_shape
        if residual_scale_init is None:
            residual_scale_init = 0.0 if residual_scale_shape == "scalar" else cait_init(num_sublayers // 2)
        self.init = float(residual_scale_init)

    @classmethod
    def build(cls, dims: ModelDims, options: dict) -> ResidualScale:
        return cls(dims.num_sublayers, dims.eps, **options)

    def read_params(self, j: int, hidden_size: int) -> nn.Module | None:
        if j == self.num_sublayers:
            return None
        return ResidualGain(hidden_size if self.shape == "vector" else 1, self.init)

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params=None, scores=None) -> State:
        return (state[0] + params.gain.to(out.dtype) * out,)

    def __repr__(self) -> str:
        return f"ResidualScale(num_sublayers={self.num_sublayers}, shape={self.shape!r}, init={self.init:g})"
