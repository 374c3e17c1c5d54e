"""Each layout's config keys, and the block-size unit conversions.

``*_out(config) -> dict`` gives the foreign config.json keys of an :class:`~attnres.AttnResConfig`;
``*_in(dict) -> dict`` gives AttnResConfig keyword arguments back. Our S counts sublayers (attention and
MLP one each); the layouts count (key: unit; AttnRes off; Full, S = 1):

- attnres: ``attn_res_block_size`` sublayers (or ``attn_res_block_layers`` / ``attn_res_num_blocks``);
  ``residual="standard"``; ``residual="full"``.
- k3: ``attn_res_block_size`` decoder layers, S = 2n; None (0 is read as off too); no form.
- fla: ``attnres_block_size`` sublayers, S = n; None; 1.
- torchtitan: ``attn_res.num_blocks`` blocks, layers per block = ceil(L / n) (we also write the exact
  ``attn_res.layers_per_block``); ``attn_res.enabled = false``; no form.
- megatron: ``attn_res_block_layers`` hybrid-stack entries = sublayers, S = n;
  ``enable_attention_residuals = false``; 1.
- gguf: ``{arch}.attn_res_block_size`` decoder layers; the key absent (or 0); no form.

A block size a layout cannot express (an odd S where it counts layers) is a :class:`ConvertError`.
Keys that are absent fall back to our defaults, except the five that fix the shapes (``REQUIRED``).
Whether a model ties its LM head is read from the weights when the config does not say.
"""

from __future__ import annotations

from .errors import ConvertError

ARCH = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
REQUIRED = frozenset(ARCH[:5])
SAME = {k: k for k in ARCH}
OWN = ("residual", "attn_res_block_size", "attn_res_num_blocks", "attn_res_block_layers",
       "attn_res_final_aggregation", "attn_res_two_phase")

Path = str | tuple[str, ...]  # a key, or a path into nested dicts


def _parts(path: Path) -> tuple[str, ...]:
    return path if isinstance(path, tuple) else (path,)


def get(d: dict, path: Path):
    """The value at ``path`` in ``d`` (None when absent)."""
    for part in _parts(path):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, path: Path, value) -> None:
    *parents, last = _parts(path)
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def arch_out(config, names: dict[str, Path]) -> dict:
    out: dict = {}
    for ours, theirs in names.items():
        _set(out, theirs, getattr(config, ours))
    return out


def arch_in(d: dict, names: dict[str, Path], layout: str) -> dict:
    kwargs = {}
    for ours, theirs in names.items():
        value = get(d, theirs)
        if value is None and ours in REQUIRED:
            raise ConvertError(f"layout {layout}: the config lacks {'.'.join(_parts(theirs))} ({ours})")
        if value is not None:
            kwargs[ours] = value
    return kwargs


def _positive(n, layout: str, key: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ConvertError(f"layout {layout}: {key} must be a positive int, got {n!r}")
    return n


def _layers(config, layout: str, key: str) -> int | None:
    """Our block size in decoder layers (None for standard); an error where S is not whole layers."""
    s = config.block_size
    if s is None:
        return None
    if s % 2:
        what = "residual='full' (1 sublayer per block)" if config.residual == "full" else f"blocks of {s} sublayers"
        raise ConvertError(f"layout {layout} counts {key} in decoder layers; this model has {what}, "
                           "not a whole number of layers")
    return s // 2


def _from_layers(n, layout: str, key: str) -> dict:
    if n in (None, 0):
        return {"residual": "standard"}
    return {"residual": "block", "attn_res_block_layers": _positive(n, layout, key)}


def _from_sublayers(n, layout: str, key: str) -> dict:
    if n is None:
        return {"residual": "standard"}
    if _positive(n, layout, key) == 1:
        return {"residual": "full"}
    return {"residual": "block", "attn_res_block_size": n}


# ----------------------------------------------------------------------------- attnres (ours)


def _default_rope(config, layout: str) -> None:
    """A layout whose config has no RoPE scaling keys takes the default RoPE only (never dropped silently)."""
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ConvertError(f"layout {layout}: RoPE type {rope_type!r} has no form in its config (default RoPE only; "
                           "the attnres and k3 layouts carry rope_parameters)")


def _rope_in(d: dict, path: Path) -> dict:
    """A ``rope_parameters`` dict at ``path`` of a foreign config (HF convention), as our keyword."""
    params = get(d, path)
    return {"rope_parameters": dict(params)} if isinstance(params, dict) and params else {}


def attnres_out(config) -> dict:
    return config.to_dict()


def attnres_in(d: dict) -> dict:
    kwargs = arch_in(d, SAME, "attnres")
    kwargs.update({k: d[k] for k in OWN if d.get(k) is not None})
    kwargs.update(_rope_in(d, "rope_parameters"))
    return kwargs


# ----------------------------------------------------------------------------- Kimi-K3 hub (vLLM, SGLang, mlx-lm)

K3_ARCH = {**SAME, "rope_theta": ("rope_parameters", "rope_theta")}


def k3_out(config) -> dict:
    out = {"model_type": "kimi_linear", **arch_out(config, K3_ARCH)}
    out["rope_parameters"] = {**(getattr(config, "rope_parameters", None) or {"rope_type": "default"}),
                              "rope_theta": config.rope_theta}
    out["attn_res_block_size"] = _layers(config, "k3", "attn_res_block_size")
    return out


def k3_in(d: dict) -> dict:
    if get(d, K3_ARCH["rope_theta"]) is None and d.get("rope_theta") is not None:  # older flat spelling
        d = {**d, "rope_parameters": {"rope_theta": d["rope_theta"]}}
    return {**arch_in(d, K3_ARCH, "k3"), **_rope_in(d, "rope_parameters"),
            **_from_layers(d.get("attn_res_block_size"), "k3", "attn_res_block_size")}


# ----------------------------------------------------------------------------- fla 0.6 TransformerConfig

FLA_ARCH = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
            "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_heads",
            "num_key_value_heads": "num_kv_heads", "max_position_embeddings": "max_position_embeddings",
            "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta", "tie_word_embeddings": "tie_word_embeddings"}
FLA_FIXED = {"hidden_act": ("swish", "silu"), "qkv_bias": (False,), "qk_norm": (False,), "window_size": (None,)}


def fla_out(config) -> dict:
    _default_rope(config, "fla")
    fixed = {k: v[0] for k, v in FLA_FIXED.items()}
    return {"model_type": "transformer", **fixed, **arch_out(config, FLA_ARCH), "attnres_block_size": config.block_size}


def fla_in(d: dict) -> dict:
    for key, allowed in FLA_FIXED.items():
        if key in d and d[key] not in allowed:
            raise ConvertError(f"layout fla: {key}={d[key]!r} has no attnres form (allowed: {allowed})")
    return {**arch_in(d, FLA_ARCH, "fla"),
            **_from_sublayers(d.get("attnres_block_size"), "fla", "attnres_block_size")}


# ----------------------------------------------------------------------------- torchtitan (llama3 + kimi_k3 attn_res)

# llama3's args derive the FFN width from multiple_of / ffn_dim_multiplier; we write it as FeedForward's hidden_dim
TITAN_ARCH = {"vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "hidden_dim",
              "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
              "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
              "tie_word_embeddings": "enable_weight_tying"}


def torchtitan_out(config) -> dict:
    _default_rope(config, "torchtitan")
    out = arch_out(config, TITAN_ARCH)
    per_block, layers = _layers(config, "torchtitan", "attn_res.num_blocks"), config.num_hidden_layers
    if per_block is None:
        out["attn_res"] = {"enabled": False}
        return out
    if per_block > layers:
        raise ConvertError(f"layout torchtitan: blocks of {per_block} layers are longer than the model "
                           f"({layers} layers); torchtitan needs layers_per_block <= n_layers")
    out["attn_res"] = {"enabled": True, "num_blocks": -(-layers // per_block), "layers_per_block": per_block,
                       "norm_eps": config.rms_norm_eps}
    return out


def torchtitan_in(d: dict) -> dict:
    kwargs = arch_in(d, TITAN_ARCH, "torchtitan")
    res = d.get("attn_res") or {}
    if not res.get("enabled"):
        return {**kwargs, "residual": "standard"}
    per_block = res.get("layers_per_block")  # exact; num_blocks alone is not invertible (ceil)
    if per_block is None:
        blocks = _positive(res.get("num_blocks"), "torchtitan", "attn_res.num_blocks")
        per_block = -(-kwargs["num_hidden_layers"] // blocks)
    eps, key_eps = kwargs.get("rms_norm_eps", 1e-6), res.get("norm_eps")
    if key_eps is not None and key_eps != eps:
        raise ConvertError(f"layout torchtitan: attn_res.norm_eps={key_eps} differs from norm_eps={eps}; "
                           "attnres uses one epsilon for the key norm and the PreNorm")
    return {**kwargs, **_from_layers(per_block, "torchtitan", "attn_res.layers_per_block")}


# ----------------------------------------------------------------------------- Megatron-LM PR #6840 (hybrid stack)

MEGATRON_ARCH = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "ffn_hidden_size",
                 "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_query_groups",
                 "max_position_embeddings": "max_position_embeddings", "rms_norm_eps": "layernorm_epsilon",
                 "rope_theta": "rotary_base"}


def megatron_out(config) -> dict:
    _default_rope(config, "megatron")
    layers, s = config.num_hidden_layers, config.block_size
    return {**arch_out(config, MEGATRON_ARCH), "num_layers": 2 * layers, "is_hybrid_model": True,
            "hybrid_layer_pattern": "*-" * layers, "normalization": "RMSNorm", "swiglu": True,
            "position_embedding_type": "rope", "add_bias_linear": False,
            "untie_embeddings_and_output_weights": not config.tie_word_embeddings,
            "enable_attention_residuals": s is not None, "attn_res_block_layers": s}


def megatron_in(d: dict) -> dict:
    pattern = str(d.get("hybrid_layer_pattern") or "").replace("|", "")
    if not d.get("is_hybrid_model") or not pattern or pattern != "*-" * (len(pattern) // 2):
        got = d.get("hybrid_layer_pattern")
        raise ConvertError("layout megatron: only a hybrid stack of attention/MLP pairs maps to attnres "
                           f"(is_hybrid_model and hybrid_layer_pattern '*-*-...'), got {got!r}")
    if d.get("num_layers") not in (None, len(pattern)):
        raise ConvertError(f"layout megatron: num_layers={d['num_layers']} but the pattern has {len(pattern)} entries")
    kwargs = {**arch_in(d, MEGATRON_ARCH, "megatron"), "num_hidden_layers": len(pattern) // 2}
    if d.get("untie_embeddings_and_output_weights") is not None:
        kwargs["tie_word_embeddings"] = not d["untie_embeddings_and_output_weights"]
    if not d.get("enable_attention_residuals"):
        return {**kwargs, "residual": "standard"}
    block = _positive(d.get("attn_res_block_layers"), "megatron", "attn_res_block_layers")
    return {**kwargs, **_from_sublayers(block, "megatron", "attn_res_block_layers")}


# ----------------------------------------------------------------------------- llama.cpp / GGUF metadata


def _gguf_names(arch: str) -> dict[str, str]:
    return {"vocab_size": f"{arch}.vocab_size", "hidden_size": f"{arch}.embedding_length",
            "intermediate_size": f"{arch}.feed_forward_length", "num_hidden_layers": f"{arch}.block_count",
            "num_attention_heads": f"{arch}.attention.head_count",
            "num_key_value_heads": f"{arch}.attention.head_count_kv",
            "max_position_embeddings": f"{arch}.context_length",
            "rms_norm_eps": f"{arch}.attention.layer_norm_rms_epsilon", "rope_theta": f"{arch}.rope.freq_base"}


def gguf_out(config) -> dict:
    _default_rope(config, "gguf")
    out = {"general.architecture": "llama", **arch_out(config, _gguf_names("llama")),
           "llama.rope.dimension_count": config.hidden_size // config.num_attention_heads}
    per_block = _layers(config, "gguf", "llama.attn_res_block_size")
    if per_block is not None:
        out["llama.attn_res_block_size"] = per_block
    return out


def gguf_in(d: dict) -> dict:
    arch = d.get("general.architecture", "llama")
    key = f"{arch}.attn_res_block_size"
    return {**arch_in(d, _gguf_names(arch), "gguf"), **_from_layers(d.get(key), "gguf", key)}
