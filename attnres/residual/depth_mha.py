"""QKV multi-head attention over depth (ZOO.md §4c): the misreading "Attention(Q=h_{l-1}, K=[...], V=[...])".

Full AttnRes's sources, v_0 = the embedding and v_i = the output of sublayer i, with a depth KV cache:
each source writes its key and value once, k_i = W_K^(i) RMSNorm(v_i) and u_i = W_V^(i) v_i, and each read
point l (the final aggregation included) has its own query and output projections:
q_l = W_Q^(l) RMSNorm(c_l) with c_l the most recent source, per head g (d_h = D / H)
alpha^g_{i->l} = softmax_i(q_l^g . k_i^g / sqrt(d_h)), h_l = W_O^(l) concat_g(sum_i alpha^g u_i^g).
RMSNorms here have no gain (the projections absorb it). H = ``depth_mha_heads`` (None: the model's
``num_attention_heads``).

Init: W_Q = 0 (uniform weights), W_V = W_O = I, W_K ~ N(0, initializer_range): at step 0 this *is* Full
AttnRes at zero init, the uniform mean of the sources. Cost ~4 D^2 parameters and ~8 D^2 FLOPs per token
per sublayer (AttnRes: 2 D parameters). The paper's default query is static and K = RMSNorm(V) with no
projections (PAPER §8); multi-head depth weights hurt in its Table 4.

Parameters of read point j (``layers.{i}.attn_res`` / ``mlp_res``, ``output_res``): ``query_proj``,
``out_proj`` (the reader) and, for j < L, ``key_proj``, ``value_proj`` (the writer of v_{j+1}); read point
0 also owns the embedding's ``embed_key_proj`` and ``embed_value_proj``. All ``[D, D]``, fp32.

State: ``(v_0,)`` before sublayer 0 writes, then ``(c, k_0, u_0, ..., k_m, u_m)`` with c the newest source.
One layout in every mode.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._checks import compute_dtype
from .base import Pass, ResidualParams, ResidualScheme, State, init_copy_
from .keys import Key, ModelDims


class DepthAttention(ResidualParams):
    """One read point's projections (see the module docstring), ``[D, D]`` each, fp32."""

    def __init__(self, hidden_size: int, writer: bool, embedding: bool, read_point: int = 0):
        super().__init__()
        self.hidden_size, self.read_point = hidden_size, read_point
        names = ["query_proj", "out_proj"] + (["key_proj", "value_proj"] if writer else []) \
            + (["embed_key_proj", "embed_value_proj"] if embedding else [])
        for name in names:
            setattr(self, name, nn.Parameter(torch.empty(hidden_size, hidden_size, dtype=torch.float32)))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for name, p in self.named_parameters(recurse=False):
            if name == "query_proj":
                nn.init.zeros_(p)
            elif name.endswith("key_proj"):  # random, but not from the global RNG (see _own_generator)
                init_copy_(p, torch.randn(p.shape, generator=self._own_generator(name)) * std)
            else:  # out_proj, value_proj, embed_value_proj
                nn.init.eye_(p)

    def _own_generator(self, name: str) -> torch.Generator:
        """A generator seeded from the global seed, the read point and the parameter's name: the draw is
        reproducible under ``torch.manual_seed`` but takes nothing from the global RNG, so the shared
        weights drawn after it are the same as in every other scheme (arms compared on equal terms)."""
        key = f"{torch.initial_seed()}/{self.read_point}/{name}".encode()
        return torch.Generator().manual_seed(zlib.crc32(key))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}"


def _rms(x: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class DepthMHA(ResidualScheme):
    name = "depth_mha"
    keys = (
        Key("depth_mha_heads", None, "H heads of the attention over depth; must divide hidden_size; None: "
            "the model's num_attention_heads", unit="heads", minimum=1, optional=True),
    )

    def __init__(self, num_sublayers: int, eps: float = 1e-6, depth_mha_heads: int | None = None,
                 hidden_size: int | None = None):
        super().__init__(num_sublayers, eps)
        heads = self.keys[0].validate(depth_mha_heads)
        if heads is None:
            raise ValueError("depth_mha needs a head count: depth_mha_heads or the model's num_attention_heads")
        if hidden_size is not None and hidden_size % heads:
            raise ValueError(f"depth_mha_heads must divide hidden_size ({hidden_size}), got {heads}")
        self.heads = heads

    @classmethod
    def build(cls, dims: ModelDims, options: dict) -> DepthMHA:
        heads = options.get("depth_mha_heads")
        return cls(dims.num_sublayers, dims.eps, dims.num_attention_heads if heads is None else heads,
                   dims.hidden_size)

    def read_params(self, j: int, hidden_size: int) -> nn.Module | None:
        if hidden_size % self.heads:
            raise ValueError(f"depth_mha_heads must divide hidden_size ({hidden_size}), got {self.heads}")
        return DepthAttention(hidden_size, writer=j < self.num_sublayers, embedding=j == 0, read_point=j)

    def start(self, embedding: Tensor, ctx: Pass) -> State:
        return (embedding,)

    def _kv(self, v: Tensor, k_proj: Tensor, v_proj: Tensor) -> tuple[Tensor, Tensor]:
        ct = compute_dtype(v.dtype)
        x = v.to(ct)
        return (F.linear(_rms(x, self.eps), k_proj.to(ct)).to(v.dtype), F.linear(x, v_proj.to(ct)).to(v.dtype))

    def _cache(self, state: State, params: DepthAttention) -> tuple[Tensor, ...]:
        """(k_0, u_0, ..., k_m, u_m): the state's, or the embedding's before sublayer 0 wrote."""
        if len(state) == 1:
            return self._kv(state[0], params.embed_key_proj, params.embed_value_proj)
        return state[1:]

    def _mix(self, state: State, j: int, params: DepthAttention, ctx: Pass) -> Tensor:
        c, cache = state[0], self._cache(state, params)
        ct = compute_dtype(c.dtype)
        d = c.shape[-1]
        dh = d // self.heads
        k = torch.stack([t.to(ct) for t in cache[0::2]]).unflatten(-1, (self.heads, dh))  # [n, ..., H, dh]
        u = torch.stack([t.to(ct) for t in cache[1::2]]).unflatten(-1, (self.heads, dh))
        q = F.linear(_rms(c.to(ct), self.eps), params.query_proj.to(ct)).unflatten(-1, (self.heads, dh))
        p = torch.softmax((q * k).sum(-1) / math.sqrt(dh), dim=0)  # [n, ..., H]
        h = F.linear((p.unsqueeze(-1) * u).sum(0).flatten(-2), params.out_proj.to(ct)).to(c.dtype)
        self._record(ctx, j, h, p)
        return h

    def read(self, state: State, j: int, query: DepthAttention, norm: nn.Module, ctx: Pass, plan=None) -> Tensor:
        self._check_read(j)
        return norm(self._mix(state, j, query, ctx))

    def write(self, state: State, j: int, out: Tensor, ctx: Pass, params=None, scores=None) -> State:
        return (out, *self._cache(state, params), *self._kv(out, params.key_proj, params.value_proj))

    def finish(self, state: State, query: DepthAttention, norm: nn.Module, ctx: Pass) -> Tensor:
        return norm(self._mix(state, self.num_sublayers, query, ctx))

    def __repr__(self) -> str:
        return f"DepthMHA(num_sublayers={self.num_sublayers}, heads={self.heads})"
