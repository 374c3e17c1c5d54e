"""Small forwards written in other stacks' naming and conventions, from their published code, using nothing
from attnres: plain functions over a foreign state dict and config. fp64, causal, no cache.

- fla: per-sublayer blocks (``attnres_block_size`` counts sublayers); a read scores ``res_proj(res_norm(V))``
  (nn.RMSNorm then Linear(D, 1)); HF RoPE (rotate halves).
- torchtitan kimi_k3: per-layer blocks, ``is_block_start = layer % layers_per_block == 0`` committed after
  the pre-attention read (``attn_res_model.py``); wq / wk in interleaved RoPE (torchtitan's complex
  ``freqs_cis``); ``feed_forward.w2(silu(w1 x) * w3 x)``.
- gguf: per-layer blocks (``attn_res_block_size``); a read scores <rms_norm(v), s> with the fused s;
  llama.cpp's normal RoPE (adjacent pairs); no ``output.weight`` = tied to ``token_embd``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def angles(t: int, hd: int, theta: float):
    """[T, hd / 2] rotation angles, in fp32 as every stack computes them (torchtitan's precompute_freqs_cis)."""
    return torch.outer(torch.arange(t).float(), 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd)))


def rope_halves(x, theta):
    """HF / fla: the head's first half rotates against its second half. x: [B, T, H, hd]."""
    hd = x.shape[-1]
    ang = angles(x.shape[1], hd, theta)
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_pairs(x, theta):
    """torchtitan (view_as_complex * freqs_cis) and llama.cpp mode 0: adjacent pairs rotate together."""
    ang = angles(x.shape[1], x.shape[-1], theta)
    # torchtitan's freqs_cis = polar(1, ang); built from cos / sin here, as polar's fp32 kernel may differ by
    # an ulp, which would force a loose tolerance on the whole check
    freqs = torch.complex(ang.cos().to(x.dtype), ang.sin().to(x.dtype))[:, None]  # [T, 1, hd / 2]
    return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous()) * freqs).flatten(-2)


def attention(x, wq, wk, wv, wo, heads, kv_heads, rope, theta):
    b, t, d = x.shape
    hd = d // heads
    q = rope((x @ wq.T).view(b, t, heads, hd), theta)
    k = rope((x @ wk.T).view(b, t, kv_heads, hd), theta).repeat_interleave(heads // kv_heads, dim=2)
    v = (x @ wv.T).view(b, t, kv_heads, hd).repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(b, t, d) @ wo.T


def swiglu(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def mix(sources, scores):
    """Softmax over depth of per-source scores [B, T], then the weighted sum of the raw sources."""
    w = torch.stack(scores).softmax(0)
    return sum(wi[..., None] * v for wi, v in zip(w, sources, strict=True))


def read_proj_norm(sources, proj, norm, eps):
    """fla / torchtitan / K3: logits = proj(norm(V)), proj a Linear(D, 1) weight [1, D]."""
    return mix(sources, [(rms(v, norm, eps) @ proj.T)[..., 0] for v in sources])


def read_score(sources, score, eps):
    """llama.cpp: logits = <rms_norm(v), s>, s = norm.w * proj.w fused at conversion."""
    return mix(sources, [rms(v, 1.0, eps) @ score for v in sources])


def fla_forward(sd, cfg, ids):
    eps, theta, size = cfg["norm_eps"], cfg["rope_theta"], cfg["attnres_block_size"]
    h = sd["model.embeddings.weight"][ids]
    blocks, partial = [], h
    for j in range(2 * cfg["num_hidden_layers"]):
        p, is_mlp = f"model.layers.{j // 2}.", j % 2 == 1
        kind = "mlp" if is_mlp else "attn"
        x = partial if size is None else read_proj_norm(
            [*blocks, partial], sd[f"{p}{kind}_res_proj.weight"], sd[f"{p}{kind}_res_norm.weight"], eps)
        if size is not None and j % size == 0:  # a sublayer opening a block commits the finished one
            blocks, partial = [*blocks, partial], None
        x = rms(x, sd[f"{p}{kind}_norm.weight"], eps)
        if is_mlp:
            out = swiglu(x, *(sd[f"{p}mlp.{n}_proj.weight"] for n in ("gate", "up", "down")))
        else:
            out = attention(x, *(sd[f"{p}attn.{n}_proj.weight"] for n in "qkvo"), cfg["num_heads"],
                            cfg["num_kv_heads"], rope_halves, theta)
        partial = out if partial is None else partial + out
    sources = [*blocks, partial]
    if "model.res_proj.weight" in sd:
        h = read_proj_norm(sources, sd["model.res_proj.weight"], sd["model.res_norm.weight"], eps)
    else:
        h = sum(sources)
    return rms(h, sd["model.norm.weight"], eps) @ sd.get("lm_head.weight", sd["model.embeddings.weight"]).T


def torchtitan_forward(sd, cfg, ids):
    eps, theta, res = cfg["norm_eps"], cfg["rope_theta"], cfg["attn_res"]
    per_block = res.get("layers_per_block") or -(-cfg["n_layers"] // res["num_blocks"])
    h = sd["tok_embeddings.weight"][ids]
    blocks, partial = [], h
    for i in range(cfg["n_layers"]):
        p = f"layers.{i}."
        x = read_proj_norm([*blocks, partial], sd[p + "attention_res_proj.weight"], sd[p + "attention_res_norm.weight"],
                           eps)
        if i % per_block == 0:
            blocks, partial = [*blocks, partial], None
        out = attention(rms(x, sd[p + "attention_norm.weight"], eps),
                        *(sd[f"{p}attention.w{n}.weight"] for n in "qkvo"), cfg["n_heads"], cfg["n_kv_heads"],
                        rope_pairs, theta)
        partial = out if partial is None else partial + out
        x = read_proj_norm([*blocks, partial], sd[p + "ffn_res_proj.weight"], sd[p + "ffn_res_norm.weight"], eps)
        x = rms(x, sd[p + "ffn_norm.weight"], eps)
        partial = partial + swiglu(x, *(sd[f"{p}feed_forward.w{n}.weight"] for n in "132"))
    sources = [*blocks, partial]
    if "output_res_proj.weight" in sd:
        h = read_proj_norm(sources, sd["output_res_proj.weight"], sd["output_res_norm.weight"], eps)
    else:
        h = sum(sources)
    return rms(h, sd["norm.weight"], eps) @ sd["output.weight"].T


def gguf_forward(sd, kv, ids):
    eps, theta = kv["llama.attention.layer_norm_rms_epsilon"], kv["llama.rope.freq_base"]
    per_block, layers = kv["llama.attn_res_block_size"], kv["llama.block_count"]
    heads, kv_heads = kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]
    h = sd["token_embd.weight"][ids]
    blocks, partial = [], h
    for i in range(layers):
        p = f"blk.{i}."
        x = read_score([*blocks, partial], sd[p + "attn_res_score.weight"], eps)
        if i % per_block == 0:
            blocks, partial = [*blocks, partial], None
        out = attention(rms(x, sd[p + "attn_norm.weight"], eps),
                        *(sd[p + n + ".weight"] for n in ("attn_q", "attn_k", "attn_v", "attn_output")), heads,
                        kv_heads, rope_pairs, theta)
        partial = out if partial is None else partial + out
        x = rms(read_score([*blocks, partial], sd[p + "ffn_res_score.weight"], eps), sd[p + "ffn_norm.weight"], eps)
        partial = partial + swiglu(x, *(sd[p + n + ".weight"] for n in ("ffn_gate", "ffn_up", "ffn_down")))
    sources = [*blocks, partial]
    h = read_score(sources, sd["output_res_score.weight"], eps) if "output_res_score.weight" in sd else sum(sources)
    return rms(h, sd["output_norm.weight"], eps) @ sd.get("output.weight", sd["token_embd.weight"]).T


FORWARDS = {"fla": fla_forward, "torchtitan": torchtitan_forward, "gguf": gguf_forward}
