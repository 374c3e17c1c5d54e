"""Convert state dicts between our names and a layout's: :func:`to_layout`, :func:`from_layout`, :func:`convert`.

A *plan* lists, for a config and a layout, every weight as an :class:`Entry`: our key(s), the foreign
key, our shape and a codec (how the values move: a copy, a [D] <-> [1, D] reshape, a RoPE row
permutation, or the GGUF fused score). Both directions check the state dict against the plan before
converting anything: a missing key, an unexpected key or a wrong shape is one :class:`ConvertError`
naming the layout and the first offending key.

Exactness: every codec is a reshape, a row permutation or a copy (AttnRes weights become at least fp32,
as our model keeps them: a bf16 hub tensor widens exactly; exports keep our dtype), so
``from_layout(to_layout(sd))`` gives ``sd`` back and the reverse trip gives the foreign dict back, except
GGUF, whose fused score s = q * g cannot be split: importing it gives pseudo_query = s and
key_norm_weight = 1, the same forward (q * g is what a read computes) but not the same parameters.

Layer 0's pre-attention read has one source, so it is never read (its weights do nothing); exports
always write it, imports accept its absence (then it keeps its init: pseudo_query 0, key_norm_weight 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models import AttnResConfig
from ..models.legacy import convert_legacy_state_dict
from .errors import ConvertError
from .layouts import EMBED, LM_HEAD, READS, ROPE_ROWS, SHARED, Layout, ReadNames, get_layout, guess_layout

MISSING_FINAL = ("sum", "init")

# ----------------------------------------------------------------------------- codecs


class Copy:
    """The same tensor under another name."""

    def shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        return ours

    def out(self, t: Tensor, *rest: Tensor) -> Tensor:
        return t

    def into(self, t: Tensor) -> tuple[Tensor, ...]:
        return (t,)


def _wide(t: Tensor) -> Tensor:
    """At least fp32, as our model keeps AttnRes weights (a bf16 hub tensor widens exactly; fp64 stays)."""
    return t if t.dtype == torch.float64 else t.to(torch.float32)


class Fp32(Copy):
    """A key-norm gain or pseudo-query: ours is fp32."""

    def into(self, t: Tensor) -> tuple[Tensor, ...]:
        return (_wide(t),)


class Row(Fp32):
    """A pseudo-query stored as a Linear(D, 1) weight, [1, D]."""

    def shape(self, ours):
        return (1, *ours)

    def out(self, t, *rest):
        return t.reshape(1, -1)

    def into(self, t):
        return (_wide(t.reshape(-1)),)


@dataclass(frozen=True)
class Rope(Copy):
    """q / k rows in interleaved RoPE order (adjacent pairs) instead of HF's halves, per head."""

    heads: int

    def out(self, t, *rest):
        return t.reshape(self.heads, 2, -1, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    def into(self, t):
        return (t.reshape(self.heads, -1, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape),)


class Fused(Copy):
    """GGUF's score vector s = key_norm_weight * pseudo_query; imported as (s, ones)."""

    def out(self, q, g):
        return _wide(q) * _wide(g)

    def into(self, t):
        s = _wide(t)
        return s, torch.ones_like(s)


@dataclass(frozen=True)
class Entry:
    ours: tuple[str, ...]  # one key, or (pseudo_query, key_norm_weight) for a fused score
    theirs: str
    shape: tuple[int, ...]  # our shape (of each of ours)
    codec: Copy
    optional: bool = False  # an import may lack it: layer 0's unread pre-attention read; a tied LM head


# ----------------------------------------------------------------------------- plans


def _shared_shape(name: str, c: AttnResConfig) -> tuple[int, ...]:
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    leaf = name.rsplit(".", 2)[-2]
    return {"embed_tokens": (c.vocab_size, d), "lm_head": (c.vocab_size, d), "q_proj": (c.num_attention_heads * hd, d),
            "k_proj": (c.num_key_value_heads * hd, d), "v_proj": (c.num_key_value_heads * hd, d),
            "o_proj": (d, c.num_attention_heads * hd), "gate_proj": (c.intermediate_size, d),
            "up_proj": (c.intermediate_size, d), "down_proj": (d, c.intermediate_size)}.get(leaf, (d,))


def _shared_entries(c: AttnResConfig, lay: Layout, layer: int | None) -> list[Entry]:
    names = [n for n in SHARED if ("{i}" in n) == (layer is not None)]
    entries = []
    for name in names:
        codec = Copy()
        if lay.rope == "interleaved" and name in ROPE_ROWS:
            codec = Rope(getattr(c, ROPE_ROWS[name]))
        ours, theirs = name.format(i=layer), lay.shared[name].format(i=layer)
        entries.append(Entry((ours,), theirs, _shared_shape(name, c), codec, optional=name == LM_HEAD))
    return entries


def _read_entries(c: AttnResConfig, lay: Layout, kind: str, i: int, j: int) -> list[Entry]:
    names: ReadNames = lay.reads[kind]
    base, shape, optional = READS[kind].format(i=i), (c.hidden_size,), kind == "attn" and i == 0
    q, g = f"{base}.pseudo_query", f"{base}.key_norm_weight"
    if lay.query == "fused":
        return [Entry((q, g), names.query.format(i=i, j=j), shape, Fused(), optional)]
    query = Row() if lay.query == "row" else Fp32()
    return [Entry((q,), names.query.format(i=i, j=j), shape, query, optional),
            Entry((g,), names.norm.format(i=i, j=j), shape, Fp32(), optional)]


def check_convertible(config: AttnResConfig) -> None:
    """The layouts hold standard, Block and Full AttnRes at their paper form: another scheme, or a Table 4
    option off its default (same weight names, another function), would convert into a model that computes
    something else, so it is a :class:`ConvertError`."""
    from ..residual.registry import REGISTRY

    if config.residual not in ("standard", "block", "full"):
        raise ConvertError(f"residual={config.residual!r} has no weight map; the layouts hold standard, block "
                           "and full AttnRes")
    for key in REGISTRY[config.residual].keys:
        value = getattr(config, key.name, key.default)
        if value != key.default:
            raise ConvertError(f"{key.name}={value!r} (a Table 4 option) has no weight map; only the paper's "
                               f"form ({key.name}={key.default!r}) converts")


def plan(config: AttnResConfig, layout: str | Layout) -> list[Entry]:
    """Every weight of a model with ``config``, in model order, as it maps to ``layout``."""
    check_convertible(config)
    lay, c = get_layout(layout), config
    attnres = c.residual != "standard"
    head, tail = _shared_entries(c, lay, None), []
    entries = [head[0]]  # the embedding
    for i in range(c.num_hidden_layers):
        entries += _shared_entries(c, lay, i)
        if attnres:
            entries += _read_entries(c, lay, "attn", i, 2 * i) + _read_entries(c, lay, "mlp", i, 2 * i + 1)
    if attnres and c.attn_res_final_aggregation:
        tail = _read_entries(c, lay, "final", c.num_hidden_layers, 2 * c.num_hidden_layers)
    return entries + head[1:2] + tail + head[2:]  # ..., norm, final read, lm_head


# ----------------------------------------------------------------------------- checks


def _check(sd: dict, wanted: dict[str, tuple[tuple[int, ...], bool]], where: str, names: str) -> None:
    """``wanted``: key -> (shape, optional); ``names``: the layout whose names ``sd`` should have. Raise on the
    first missing key, wrong shape, or unexpected key."""
    missing = [k for k, (_, optional) in wanted.items() if k not in sd and not optional]
    if missing:
        raise ConvertError(f"{where}: missing {missing[0]}{_more(missing)}{_hint(sd, names)}")
    for key, (shape, _) in wanted.items():
        if key in sd and tuple(sd[key].shape) != shape:
            raise ConvertError(f"{where}: {key} has shape {list(sd[key].shape)}, the map needs {list(shape)}")
    extra = sorted(set(sd) - set(wanted))
    if extra:
        raise ConvertError(f"{where}: unexpected key {extra[0]}{_more(extra)}{_hint(sd, names)}")


def _more(keys: list) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def _hint(sd: dict, names: str) -> str:
    guess = guess_layout(sd)
    return f"; these names look like layout {guess}" if guess and guess != names else ""


def _new_config(kwargs: dict, layout: str) -> AttnResConfig:
    try:
        return AttnResConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"layout {layout}: the config does not make an attnres model: {e}") from None


# ----------------------------------------------------------------------------- the two directions


def to_layout(state_dict: dict[str, Tensor], config: AttnResConfig, layout: str | Layout) -> tuple[dict, dict]:
    """Our state dict (``AttnResForCausalLM`` names; the old stacked ``model.residual.*`` is accepted) as
    ``layout``'s, and that layout's config keys. A tied LM head is left out."""
    lay = get_layout(layout)
    check_convertible(config)  # what no layout holds is the first thing to say
    foreign_config = lay.config_out(config)  # a block size the layout cannot express fails here
    ours = dict(state_dict)
    convert_legacy_state_dict(ours, "model.")
    entries = [e for e in plan(config, lay) if not (e.ours[0] == LM_HEAD and config.tie_word_embeddings)]
    wanted = {k: (e.shape, False) for e in entries for k in e.ours}
    if config.tie_word_embeddings:
        wanted[LM_HEAD] = ((config.vocab_size, config.hidden_size), True)
    _check(ours, wanted, f"our state dict (to layout {lay.name})", "attnres")
    return {e.theirs: e.codec.out(*(ours[k] for k in e.ours)) for e in entries}, foreign_config


def from_layout(state_dict: dict[str, Tensor], foreign_config: dict, layout: str | Layout,
                missing_final: str = "sum") -> tuple[dict, dict]:
    """``layout``'s state dict and config keys as ours: (state dict, ``AttnResConfig`` keyword arguments).

    ``missing_final``: what a checkpoint without the final aggregation's weights becomes (the config
    does not say, except ours): ``"sum"`` (default) sets ``attn_res_final_aggregation=False``, the final
    output is the plain sum of all sources; ``"init"`` keeps an aggregation at its zero init (the
    uniform mean) to train from. A checkpoint with them always gets ``attn_res_final_aggregation=True``."""
    lay = get_layout(layout)
    if missing_final not in MISSING_FINAL:
        raise ConvertError(f"missing_final must be one of {MISSING_FINAL}, got {missing_final!r}")
    if lay.name == "attnres":
        state_dict = dict(state_dict)
        convert_legacy_state_dict(state_dict, "model.")
        _check_source_options(foreign_config)
    kwargs = lay.config_in(foreign_config)
    kwargs.setdefault("tie_word_embeddings", lay.shared[LM_HEAD] not in state_dict)
    fresh_final = _decide_final(kwargs, state_dict, lay, missing_final)
    entries = plan(_new_config(kwargs, lay.name), lay)
    wanted = {e.theirs: (e.codec.shape(e.shape), e.optional or (fresh_final and e.ours[0].startswith(READS["final"])))
              for e in entries}
    _check(state_dict, wanted, f"layout {lay.name}", lay.name)
    return _read(entries, state_dict), kwargs


def _check_source_options(config: dict) -> None:
    """Our own config.json may carry a scheme or Table 4 options the maps would drop: refuse them."""
    try:
        source = AttnResConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    except (TypeError, ValueError) as e:
        raise ConvertError(f"layout attnres: the source config is not a valid AttnResConfig: {e}") from None
    check_convertible(source)


def _decide_final(kwargs: dict, state_dict: dict, lay: Layout, missing_final: str) -> bool:
    """Set ``attn_res_final_aggregation`` from the weights unless the config says (only ours does); True when
    the model gets a final aggregation the checkpoint lacks (``missing_final="init"``)."""
    if "attn_res_final_aggregation" in kwargs:
        return False
    final = lay.reads["final"]
    has = any(n in state_dict for n in (final.query, final.norm) if n)
    kwargs["attn_res_final_aggregation"] = has or missing_final == "init"
    return not has


def _read(entries: list[Entry], state_dict: dict) -> dict[str, Tensor]:
    ours = {}
    for e in entries:
        if e.theirs in state_dict:
            ours.update(zip(e.ours, e.codec.into(state_dict[e.theirs]), strict=True))
        elif e.ours[0] == LM_HEAD:
            ours[LM_HEAD] = ours[EMBED]
        else:  # an unread layer-0 read, or a fresh final aggregation: the init values
            ours.update({k: _init(k, e.shape) for k in e.ours})
    return ours


def _init(key: str, shape: tuple[int, ...]) -> Tensor:
    """A DepthQuery's init: pseudo_query 0 (PAPER §5), key_norm_weight 1."""
    return (torch.zeros if key.endswith("pseudo_query") else torch.ones)(shape, dtype=torch.float32)


def convert(state_dict: dict[str, Tensor], foreign_config: dict, source: str, target: str,
            missing_final: str = "sum") -> tuple[dict, dict, AttnResConfig]:
    """``source``'s state dict and config as ``target``'s: (state dict, config keys, our config between)."""
    ours, kwargs = from_layout(state_dict, foreign_config, source, missing_final)
    config = _new_config(kwargs, get_layout(source).name)
    sd, cfg = to_layout(ours, config, target)
    return sd, cfg, config
