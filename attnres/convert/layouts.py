"""One declarative name map per layout: where each weight of an AttnRes model lives in another stack.

Templates take ``{i}`` (decoder layer) and ``{j}`` (read point: 2i before layer i's attention, 2i + 1
before its MLP). Every stack scores a source v as <RMSNorm_g(v), q> = <v * rstd, q * g>, so a foreign
``proj.weight`` [1, D] is our ``pseudo_query`` and ``norm.weight`` our ``key_norm_weight``, exactly;
GGUF keeps only the fused s = g * q (import: pseudo_query = s, key_norm_weight = 1, the same forward).

Names were checked against public sources (the ``search`` index of this project, 2026-10):

- k3: Kimi-K3 hub names under ``language_model.model.`` with ``language_model.lm_head.weight``
  (pytorch/torchtitan ``torchtitan/models/kimi_k3/hf_key_map.py``: TEXT_PREFIX, LM_HEAD,
  ``self_attention_res_{proj,norm}``, ``mlp_res_*``, ``output_attn_res_{proj,norm}``); vLLM / SGLang /
  mlx-lm load the same names (their ``KimiDecoderLayer``: ``self_attention_res_norm`` = RMSNorm,
  ``self_attention_res_proj`` = Linear(H, 1)). The shared weights keep HF-Llama names under the prefix,
  as K3's own ``input_layernorm`` / ``post_attention_layernorm`` / ``self_attn.*`` do (K3's attention is
  MLA/KDA and its FFN MoE; a Llama-shaped model only borrows the names).
- fla: fla-org/flash-linear-attention ``fla/models/transformer/modeling_transformer.py`` for the shared
  names (``model.embeddings``, ``layers.{i}.attn_norm``, ``attn.{q,k,v,o}_proj``, ``mlp_norm``,
  ``mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head``; rotary is fla's non-interleaved
  RotaryEmbedding, HF's row order). The AttnRes names (``attn_res_{proj,norm}``, ``mlp_res_*``,
  ``model.res_{proj,norm}``) are from ../shared/ECOSYSTEM.md (fla 0.6.0 wheels); the indexed copy of that
  file predates AttnRes.
- torchtitan: AttnRes names from pytorch/torchtitan ``torchtitan/models/kimi_k3/attn_res_model.py``
  (``layers.{i}.attention_res_{proj,norm}``, ``ffn_res_*``, ``output_res_{proj,norm}``; proj =
  Linear(d, 1)). kimi_k3 has no dense GQA attention, so the shared weights take torchtitan's Llama-3
  names (``torchtitan/models/llama3/state_dict_adapter.py``: ``tok_embeddings``, ``attention.w{q,k,v,o}``,
  ``attention_norm``, ``ffn_norm``, ``feed_forward.w1`` gate / ``w3`` up / ``w2`` down, ``norm``,
  ``output``), with wq / wk rows in torchtitan's interleaved RoPE order (that adapter's ``_permute``).
- megatron: PR #6840's ``AttentionResidual`` module holds ``pseudo_query`` [H] and ``key_norm_weight``
  [H] (``megatron/core/transformer/attention_residual.py`` in the PR's fork). In a hybrid stack every
  entry is one sublayer and wraps its layer as ``layers.{e}.attn_res`` + ``layers.{e}.inner_layer``; the
  final read is ``final_attn_res`` before ``final_layernorm`` (the PR's MTP-block test). So entry e is
  our read point j. We place these under ``decoder.`` (the MTP test shows them under its own block; the
  decoder's placement is our reading). The GPT (non-hybrid) TransformerLayer attribute names were not
  found, so that stack is not mapped. The shared weights keep HF-Llama names: Megatron's fused
  ``linear_qkv`` / ``linear_fc1`` are Megatron-Bridge's job (its Llama bridge reads HF names).
- gguf: llama.cpp ``gguf-py/gguf/constants.py`` ``ATTN_RES_SCORE`` / ``FFN_RES_SCORE`` /
  ``OUTPUT_RES_SCORE`` ("fused res_norm * res_proj") = ``blk.{i}.attn_res_score.weight``,
  ``blk.{i}.ffn_res_score.weight``, ``output_res_score.weight``; Llama tensor names with q / k rows in
  llama.cpp's interleaved RoPE order (``convert_hf_to_gguf.py`` LlamaModel.permute, undone by
  transformers' ``LlamaTensorProcessor._reverse_permute_weights``, k with the KV head count). No
  ``output.weight`` means a tied LM head, as transformers' GGUF loader reads it.

Final aggregation: every layout above names one. A checkpoint that has none is imported with
``missing_final="sum"`` (default: ``attn_res_final_aggregation=False``, the plain sum of all sources) or
``"init"`` (an aggregation at its zero init, the uniform mean); see :func:`attnres.convert.from_layout`.
The HF WIP ``models/kimi_k3`` (``pre_attn_residual.pseudo_queries``) has no published final read and no
hub mapping, so it is not a layout here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import configs
from .errors import ConvertError

# our shared weights (HF Llama names); {i} = decoder layer
SHARED = (
    "model.embed_tokens.weight",
    "model.layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight",
    "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
)
EMBED, LM_HEAD = SHARED[0], SHARED[-1]
ROPE_ROWS = {SHARED[1]: "num_attention_heads", SHARED[2]: "num_key_value_heads"}  # q, k: rows per head ordered for RoPE
# our read points: the DepthQuery module of each kind ({i} = decoder layer)
READS = {"attn": "model.layers.{i}.attn_res", "mlp": "model.layers.{i}.mlp_res", "final": "model.output_res"}


@dataclass(frozen=True)
class ReadNames:
    """One read point's foreign names: the pseudo-query (or, with ``norm=None``, the fused score) and the
    key-norm gain."""

    query: str
    norm: str | None


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    shared: dict[str, str]  # our template -> foreign template
    reads: dict[str, ReadNames]  # "attn" / "mlp" / "final"
    query: str  # "vector" [D], "row" [1, D] (a Linear(D, 1) weight) or "fused" (the score s = g * q, [D])
    rope: str  # q / k row order: "half" (HF: rotate halves) or "interleaved" (adjacent pairs)
    config_out: Callable[..., dict]
    config_in: Callable[[dict], dict]


def _prefixed(prefix: str, head: str) -> dict[str, str]:
    out = {name: prefix + name.removeprefix("model.") for name in SHARED}
    out[LM_HEAD] = head
    return out


def _renamed(embed: str, layer: str, names: tuple[str, ...], norm: str, head: str) -> dict[str, str]:
    """A shared map from the nine per-layer suffixes (SHARED[1:10], in order) under ``layer``."""
    out = {EMBED: embed, SHARED[-2]: norm, LM_HEAD: head}
    out.update({ours: layer + theirs for ours, theirs in zip(SHARED[1:10], names, strict=True)})
    return out


def _pairs(attn: str, mlp: str, final: str, q: str, g: str) -> dict[str, ReadNames]:
    return {kind: ReadNames(base.format(part=q), base.format(part=g))
            for kind, base in (("attn", attn), ("mlp", mlp), ("final", final))}


ATTNRES = Layout(
    "attnres", "attnres (this package; HF Llama names)", {n: n for n in SHARED},
    _pairs("model.layers.{{i}}.attn_res.{part}", "model.layers.{{i}}.mlp_res.{part}", "model.output_res.{part}",
           "pseudo_query", "key_norm_weight"),
    "vector", "half", configs.attnres_out, configs.attnres_in,
)
K3 = Layout(
    "k3", "Kimi-K3 hub names (vLLM, SGLang, mlx-lm)",
    _prefixed("language_model.model.", "language_model.lm_head.weight"),
    _pairs("language_model.model.layers.{{i}}.self_attention_res_{part}.weight",
           "language_model.model.layers.{{i}}.mlp_res_{part}.weight",
           "language_model.model.output_attn_res_{part}.weight", "proj", "norm"),
    "row", "half", configs.k3_out, configs.k3_in,
)
FLA = Layout(
    "fla", "fla 0.6 TransformerForCausalLM",
    _renamed("model.embeddings.weight", "model.layers.{i}.",
             ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
              "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "attn_norm.weight",
              "mlp_norm.weight"), "model.norm.weight", "lm_head.weight"),
    _pairs("model.layers.{{i}}.attn_res_{part}.weight", "model.layers.{{i}}.mlp_res_{part}.weight",
           "model.res_{part}.weight", "proj", "norm"),
    "row", "half", configs.fla_out, configs.fla_in,
)
TORCHTITAN = Layout(
    "torchtitan", "torchtitan (kimi_k3 AttnRes names, Llama-3 shared names)",
    _renamed("tok_embeddings.weight", "layers.{i}.",
             ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
              "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight",
              "attention_norm.weight", "ffn_norm.weight"), "norm.weight", "output.weight"),
    _pairs("layers.{{i}}.attention_res_{part}.weight", "layers.{{i}}.ffn_res_{part}.weight",
           "output_res_{part}.weight", "proj", "norm"),
    "row", "interleaved", configs.torchtitan_out, configs.torchtitan_in,
)
MEGATRON = Layout(
    "megatron", "Megatron-LM PR #6840 hybrid stack (AttnRes names; shared weights in HF names)",
    {n: n for n in SHARED},
    _pairs("decoder.layers.{{j}}.attn_res.{part}", "decoder.layers.{{j}}.attn_res.{part}",
           "decoder.final_attn_res.{part}", "pseudo_query", "key_norm_weight"),
    "vector", "half", configs.megatron_out, configs.megatron_in,
)
GGUF = Layout(
    "gguf", "llama.cpp / GGUF tensor names (fused score vectors)",
    _renamed("token_embd.weight", "blk.{i}.",
             ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
              "ffn_up.weight", "ffn_down.weight", "attn_norm.weight", "ffn_norm.weight"),
             "output_norm.weight", "output.weight"),
    {"attn": ReadNames("blk.{i}.attn_res_score.weight", None), "mlp": ReadNames("blk.{i}.ffn_res_score.weight", None),
     "final": ReadNames("output_res_score.weight", None)},
    "fused", "interleaved", configs.gguf_out, configs.gguf_in,
)

LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (ATTNRES, K3, FLA, TORCHTITAN, MEGATRON, GGUF)}


def get_layout(name: str | Layout) -> Layout:
    if isinstance(name, Layout):
        return name
    if name not in LAYOUTS:
        raise ConvertError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def guess_layout(keys) -> str | None:
    """The layout whose embedding name is among ``keys`` (for error hints), else None."""
    keys = set(keys)
    for lay in LAYOUTS.values():
        if lay.shared[EMBED] in keys and lay.name != "megatron":  # megatron shares attnres's shared names
            return lay.name
    return None
