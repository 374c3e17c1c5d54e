"""The paper's Table 4 ablations as options of Full and Block AttnRes (ZOO.md §3), in plain PyTorch.

With every option at its default, ``residual="full"``/``"block"`` build :class:`~.block.BlockAttnRes` and
run the fast paths (fused kernels, two-phase, bank). Any other value builds :class:`AblatedAttnRes`: the
same sources (PAPER Eq. 6; the state is Block's source list) read by one PyTorch function, in every mode
(``Mode.STREAM`` layout throughout). Options, composable:

- ``attn_res_query``: ``"static"`` (the paper: q_l = w_l); ``"input_dependent"``: q_l = w_l + W_l RMSNorm(c_l),
  W_l ``[D, D]`` zero-init per read point (final aggregation included), c_l the most recent source
  (Full: v_{l-1}; Block: the partial sum, or the last completed block); ``"scalar"``: no query or key,
  a learned scalar per source (``mix_logits``, zero-init), the logits of the same softmax.
- ``attn_res_weights``: ``"softmax"`` over the sources, or ``"sigmoid"``: alpha_i = sigmoid(logit_i),
  not renormalised (at zero init h = sum(v) / 2, the standard residual after the PreNorm).
- ``attn_res_key_norm``: False scores raw values, logit_i = <w, v_i> (no RMSNorm, no gain).
- ``attn_res_window``: W: read only the embedding and the W most recent other sources (Full: sublayer
  outputs; Block: blocks, the running partial counting as one); None reads all. The final aggregation
  uses the same window. W >= the number of sources is Full/Block.
- ``attn_res_heads``: H channel groups of D / H channels; group g has its own weights
  softmax_i(<w[g], k_i[g]>). ``attn_res_head_norm``: the key RMSNorm over all D (``"full"``: H = 1 is
  Block exactly) or within each group (``"group"``).

At zero init every option but ``sigmoid`` gives the uniform mean of the sources, as default AttnRes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._checks import compute_dtype, source_dtype
from .base import Pass, ResidualParams, State
from .block import BlockAttnRes, FullAttnRes
from .keys import Key, ModelDims

KEYS = (
    Key("attn_res_query", "static", "where the logits come from: 'static' pseudo-query (the paper), "
        "'input_dependent' (w + W RMSNorm(c), W [D, D] per read point; Table 4: 1.731), 'scalar' "
        "(input-independent learned scalar per source, no query or key; Table 4: 1.749)",
        kind="choice", choices=("static", "input_dependent", "scalar")),
    Key("attn_res_weights", "softmax", "'softmax' over the sources (the paper) or unnormalised 'sigmoid' "
        "(Table 4: 1.741)", kind="choice", choices=("softmax", "sigmoid")),
    Key("attn_res_key_norm", True, "RMSNorm the keys (the paper); false scores raw values (Table 4: 1.743 "
        "Full, 1.750 Block)", kind="bool"),
    Key("attn_res_window", None, "read only the embedding and the W most recent other sources (Table 4 "
        "SWA, W = 8: 1.764); None: all", unit="sources (Full: sublayer outputs; Block: blocks)",
        minimum=1, optional=True),
    Key("attn_res_heads", 1, "H channel groups with their own depth weights (Table 4, Block, H = 16: "
        "1.752); must divide hidden_size", unit="channel groups", minimum=1),
    Key("attn_res_head_norm", "full", "with attn_res_heads > 1: key RMSNorm over all channels ('full', "
        "H = 1 is Block exactly) or within each group ('group')", kind="choice", choices=("full", "group")),
)
DEFAULTS = {k.name: k.default for k in KEYS}


class AblationQuery(ResidualParams):
    """One read point's parameters under the Table 4 options: ``pseudo_query`` [D] (0) unless scalar
    mixing, ``key_norm_weight`` [D] (1) with the key norm, ``query_proj`` [D, D] (0) for the
    input-dependent query, ``mix_logits`` [sources] (0) for scalar mixing. fp32."""

    def __init__(self, hidden_size: int, query: str, key_norm: bool, num_sources: int):
        super().__init__()
        self.hidden_size = hidden_size
        if query == "scalar":
            self.mix_logits = nn.Parameter(torch.zeros(num_sources, dtype=torch.float32))
            return
        self.pseudo_query = nn.Parameter(torch.zeros(hidden_size, dtype=torch.float32))
        if key_norm:
            self.key_norm_weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))
        if query == "input_dependent":
            self.query_proj = nn.Parameter(torch.zeros(hidden_size, hidden_size, dtype=torch.float32))

    def reset_parameters(self, std: float = 0.02) -> None:
        for name, p in self.named_parameters(recurse=False):
            (nn.init.ones_ if name == "key_norm_weight" else nn.init.zeros_)(p)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}"


class AblatedAttnRes(BlockAttnRes):
    """Full/Block AttnRes with Table 4 options (module docstring); ``name`` stays "full" or "block"."""

    has_queries = False
    uses_read_kernel = False

    def __init__(self, num_sublayers: int, block_size: int, final_aggregation: bool = True, eps: float = 1e-6,
                 *, name: str = "block", hidden_size: int | None = None, attn_res_query: str = "static",
                 attn_res_weights: str = "softmax", attn_res_key_norm: bool = True, attn_res_window: int | None = None,
                 attn_res_heads: int = 1, attn_res_head_norm: str = "full"):
        super().__init__(num_sublayers, block_size, final_aggregation, eps)
        self.name = name
        opts = dict(attn_res_query=attn_res_query, attn_res_weights=attn_res_weights,
                    attn_res_key_norm=attn_res_key_norm, attn_res_window=attn_res_window,
                    attn_res_heads=attn_res_heads, attn_res_head_norm=attn_res_head_norm)
        for key in KEYS:
            key.validate(opts[key.name])
        if attn_res_query == "scalar" and attn_res_heads != 1:
            raise ValueError(f"attn_res_heads must be 1 with attn_res_query='scalar' (a scalar per source has no "
                             f"channels to split), got {attn_res_heads}")
        if hidden_size is not None and hidden_size % attn_res_heads:
            raise ValueError(f"attn_res_heads must divide hidden_size ({hidden_size}), got {attn_res_heads}")
        self.query, self.weights, self.key_norm = attn_res_query, attn_res_weights, attn_res_key_norm
        self.window, self.heads, self.head_norm = attn_res_window, attn_res_heads, attn_res_head_norm
        self.options = opts

    def num_sources(self, j: int) -> int:
        """Sources read at read point j (``num_sublayers``: the final aggregation), after the window."""
        n, i = divmod(j, self.block_size)
        total = 1 + n + (i > 0)
        return total if self.window is None else min(total, 1 + self.window)

    def read_params(self, j: int, hidden_size: int) -> nn.Module | None:
        if j == self.num_sublayers and not self.final_aggregation:
            return None
        if hidden_size % self.heads:
            raise ValueError(f"attn_res_heads must divide hidden_size ({hidden_size}), got {self.heads}")
        return AblationQuery(hidden_size, self.query, self.key_norm, self.num_sources(j))

    def start(self, embedding: Tensor, ctx: Pass) -> State:
        return (embedding,)

    def plan(self, state, j, queries, ctx):
        return None

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params=None, scores=None) -> State:
        if j % self.block_size == 0:
            return (*state, out)
        return (*state[:-1], state[-1] + out)

    def read(self, state: State, j: int, query: nn.Module | None, norm: nn.Module, ctx: Pass, plan=None) -> Tensor:
        self._check_read(j)
        return norm(self.mix(state, j, query, ctx))

    def finish(self, state: State, query: nn.Module | None, norm: nn.Module, ctx: Pass) -> Tensor:
        j = self.num_sublayers
        if self.final_aggregation:
            return norm(self.mix(state, j, query, ctx))
        h = sum(state[1:], state[0])
        self._record(ctx, j, h)
        return norm(h)

    def mix(self, sources: State, j: int, params: AblationQuery, ctx: Pass) -> Tensor:
        """h_j from the sources read at j (the window applied here), recorded when ``ctx`` records."""
        if self.window is not None:
            sources = (sources[0], *sources[1:][-self.window:])
        dtype = source_dtype(sources)
        ct = compute_dtype(dtype)
        v = torch.stack([s.to(ct) for s in sources])  # [n, ..., D]
        n, d, heads = v.shape[0], v.shape[-1], self.heads
        if self.query == "scalar":
            logits = params.mix_logits.to(ct).reshape(n, *[1] * (v.dim() - 1))  # [n, 1.., 1]
            logits = logits.expand(*v.shape[:-1], 1)
        else:
            k = v
            if self.key_norm:
                if self.head_norm == "group" and heads > 1:
                    k = F.rms_norm(v.unflatten(-1, (heads, d // heads)), (d // heads,), eps=self.eps).flatten(-2)
                else:
                    k = F.rms_norm(v, (d,), eps=self.eps)
                k = k * params.key_norm_weight.to(ct)
            q = params.pseudo_query.to(ct)
            if self.query == "input_dependent":
                c = sources[-1].to(ct)
                q = q + F.linear(F.rms_norm(c, (d,), eps=self.eps), params.query_proj.to(ct))
            logits = (k * q).unflatten(-1, (heads, d // heads)).sum(-1)  # [n, ..., H]
        p = torch.softmax(logits, dim=0) if self.weights == "softmax" else torch.sigmoid(logits)
        h = (p.unsqueeze(-1) * v.unflatten(-1, (heads, d // heads))).sum(0).flatten(-2)
        self._record(ctx, j, h, p.squeeze(-1) if heads == 1 else p)
        return h.to(dtype)

    def __repr__(self) -> str:
        changed = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v != DEFAULTS[k])
        return (f"{type(self).__name__}(name={self.name!r}, num_sublayers={self.num_sublayers}, "
                f"block_size={self.block_size}, final_aggregation={self.final_aggregation}, {changed})")


def build(name: str, dims: ModelDims, options: dict) -> BlockAttnRes:
    """``residual="full"``/``"block"``: the fast scheme when every Table 4 option is at its default, else
    :class:`AblatedAttnRes`."""
    if all(options.get(k, v) == v for k, v in DEFAULTS.items()):
        if name == "full":
            return FullAttnRes(dims.num_sublayers, dims.final_aggregation, dims.eps)
        return BlockAttnRes(dims.num_sublayers, dims.block_size, dims.final_aggregation, dims.eps)
    block_size = 1 if name == "full" else dims.block_size
    return AblatedAttnRes(dims.num_sublayers, block_size, dims.final_aggregation, dims.eps, name=name,
                          hidden_size=dims.hidden_size, **{k: options.get(k, v) for k, v in DEFAULTS.items()})
