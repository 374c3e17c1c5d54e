"""AttnResForCausalLM: a Llama-style decoder whose residual connections are a pluggable scheme.

The network never branches on the scheme: a decoder layer takes the residual state (a tuple of
tensors) and returns the new one; each sublayer's input comes from ``scheme.read`` and its output goes
to ``scheme.write`` (DESIGN.md). Parameter names follow HF Llama, so a ``LlamaForCausalLM``
state_dict loads into a ``residual="standard"`` model and gives the same logits. A scheme's parameters
are one module per read point, ``scheme.read_params(j, hidden_size)``, in the layer that reads:
``model.layers.{i}.attn_res`` / ``model.layers.{i}.mlp_res`` and ``model.output_res`` (the final read);
for Full/Block a :class:`~attnres.residual.DepthQuery` (``pseudo_query``, ``key_norm_weight``).
Checkpoints with the older stacked names (``model.residual.*``) are converted on load (``legacy.py``).
The one other contact between scheme and network is the attention hook (``scheme.score_bias``).

HF renamed the cache keyword and output field from ``past_key_values`` to ``cache`` (transformers
5.24). Both names are accepted; outputs carry the cache in the field the installed transformers
defines (``CACHE_FIELD``). Unknown keywords raise ``TypeError``. Any ``Cache`` works, a ``StaticCache``
(``generate(cache_implementation="static")``, compiled decode) included: the mask spans the keys the
cache returns (``Cache.get_mask_sizes``: every slot of a static cache), and positions start at its
length, a tensor for a static cache, as Llama's.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from ..ops import cpu_kernel
from ..ops._checks import compute_dtype
from ..residual import Chain, Mode, Pass, ResidualParams, RMSNorm, ScoreBias, State, build_scheme
from .configuration import AttnResConfig
from .legacy import convert_legacy_state_dict, legacy_pretrained_state_dict
from .rope import inv_freq as rope_inv_freq

logger = logging.get_logger(__name__)

# below this many tokens a no-grad forward (a cached decode step: batch x 1 tokens) uses the bank
BANK_MAX_TOKENS = 64
# below this many tokens per forward a read is too small for phase 1 to pay for its extra ops
TWO_PHASE_MIN_TOKENS = 64

CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# Keywords HF generate() / Trainer pass by convention that need no handling here: generate() of
# transformers < 5.24 sends ``cache_position``, which always equals the positions the cache implies.
CONVENTION_KWARGS = frozenset({"cache_position"})


def _take_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise TypeError("got different caches as cache= and past_key_values=; pass one (they are the same keyword)")
    return cache if cache is not None else past_key_values


def _check_kwargs(kwargs: dict, owner: nn.Module) -> None:
    unknown = sorted(set(kwargs) - CONVENTION_KWARGS)
    if unknown:
        raise TypeError(f"{type(owner).__name__}.forward() got unexpected keyword argument(s): {', '.join(unknown)}")


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE, via scaled_dot_product_attention."""

    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        d, hd = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, causal: bool,
                cache: Cache | None, weights: list[Tensor] | None = None,
                score_bias: ScoreBias | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """``weights``: if a list, the attention probabilities [B, heads, q, kv] are appended to it.
        ``score_bias`` (the residual scheme's hook, :meth:`ResidualScheme.score_bias`): added to the scaled
        scores before the mask; then the output is ``(out, scores + bias)``, the sum unmasked."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if weights is None and score_bias is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.num_kv_heads != self.num_heads
            )
            return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        y, scores = self._explicit(q, k, v, mask, causal, weights, score_bias)
        out = self.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        return out if score_bias is None else (out, scores)

    def _explicit(self, q, k, v, mask, causal, weights: list[Tensor] | None,
                  score_bias: ScoreBias | None = None) -> tuple[Tensor, Tensor]:
        """The same attention with its scores and probabilities materialised (as HF's eager path: fp32
        softmax); returns the output and the scaled scores plus ``score_bias``, unmasked."""
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = logits = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        if score_bias is not None:
            if score_bias.bias is not None:
                scores = logits = scores + score_bias.bias
            if score_bias.scale != 1.0:
                logits = scores * score_bias.scale
        if causal:
            q_len, kv_len = q.shape[-2], k.shape[-2]
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        p = torch.softmax(logits, dim=-1, dtype=compute_dtype(q.dtype)).to(q.dtype)
        if weights is not None:
            weights.append(p)
        return p @ v, scores


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: AttnResConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Two sublayers, each reading its input from the residual state and writing its output back.

    ``forward(*state, ...)`` takes the state's tensors positionally (so activation checkpointing,
    reentrant or not, sees them as inputs) and returns the new state."""

    gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()

    def __init__(self, config: AttnResConfig, layer_idx: int, scheme):
        super().__init__()
        self.layer_idx = layer_idx
        self.scheme = scheme  # configuration only: no parameters, no state
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # read points 2i and 2i + 1: the scheme's parameters for them (DepthQuery for Full/Block), or None
        self.attn_res = scheme.read_params(2 * layer_idx, config.hidden_size)
        self.mlp_res = scheme.read_params(2 * layer_idx + 1, config.hidden_size)

    def forward(self, *state: Tensor, ctx: Pass, rope, mask, causal, cache, attentions=None) -> State:
        body = functools.partial(self._sublayers, ctx=ctx, rope=rope, mask=mask, causal=causal, cache=cache,
                                 attentions=attentions)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(body, *state)
        return body(*state)

    def _sublayers(self, *state: Tensor, ctx: Pass, rope, mask, causal, cache, attentions) -> State:
        scheme, j, attn_res, mlp_res = self.scheme, 2 * self.layer_idx, self.attn_res, self.mlp_res
        plan = scheme.plan(state, j, (attn_res, mlp_res), ctx)
        x = scheme.read(state, j, attn_res, self.input_layernorm, ctx, plan)
        bias = scheme.score_bias(state, j, ctx)  # the attention hook: None but for RealFormer
        if bias is None:
            state = scheme.write(state, j, self.self_attn(x, rope, mask, causal, cache, attentions), ctx, attn_res)
        else:
            out, scores = self.self_attn(x, rope, mask, causal, cache, attentions, bias)
            state = scheme.write(state, j, out, ctx, attn_res, scores)
        x = scheme.read(state, j + 1, mlp_res, self.post_attention_layernorm, ctx, plan)
        return scheme.write(state, j + 1, self.mlp(x), ctx, mlp_res)


class AttnResPreTrainedModel(PreTrainedModel):
    config_class = AttnResConfig
    config: AttnResConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    _keep_in_fp32_modules_strict = ["attn_res", "mlp_res", "output_res"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ResidualParams):  # a read point's parameters: the scheme's own init
            module.reset_parameters(self.config.initializer_range or 0.02)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As HF's; a local checkpoint saved with the older stacked AttnRes names is converted."""
        path = pretrained_model_name_or_path
        legacy = None
        if kwargs.get("state_dict") is None and path is not None:
            legacy = legacy_pretrained_state_dict(path, cls.base_model_prefix, kwargs.get("subfolder"))
        if legacy is None:
            return super().from_pretrained(path, *args, **kwargs)
        subfolder = kwargs.pop("subfolder", None) or ""
        config = kwargs.pop("config", None) or cls.config_class.from_pretrained(path, subfolder=subfolder)
        model = super().from_pretrained(None, *args, config=config, state_dict=legacy, **kwargs)
        with contextlib.suppress(OSError):
            model.generation_config = GenerationConfig.from_pretrained(path, subfolder=subfolder)
        return model


def _attention_mask(attention_mask: Tensor | None, q_len: int, past: int | Tensor, kv_len: int,
                    device) -> tuple[Tensor | None, bool]:
    """(mask for SDPA, is_causal) for ``q_len`` queries at positions ``past ..`` over ``kv_len`` keys
    (what the cache's ``update`` returns: ``past + q_len`` for a dynamic cache, every slot for a static
    one, as ``Cache.get_mask_sizes``). ``attention_mask``: None, 2D padding [B, <= kv_len] (1 = token),
    or a prepared 4D mask [B, 1, q, kv_len] (bool, True = attend, or additive, 0 = attend), which
    ``generate()`` builds for a static cache. Avoids building a mask when causal or no mask suffices;
    a static cache always gets one (its unwritten slots must be masked), built without reading
    ``past``'s value, so a compiled decode step does not sync or branch on it."""
    qi = torch.arange(q_len, device=device)[:, None] + past
    kj = torch.arange(kv_len, device=device)[None, :]
    if attention_mask is not None and attention_mask.ndim == 4:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(f"4D attention_mask covers {attention_mask.shape[-1]} keys; the cache gives {kv_len}")
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return mask | (kj == qi), False  # a query always sees itself, so fully padded rows stay finite
    exact = isinstance(past, int) and kv_len == past + q_len
    if exact and (attention_mask is None or bool(attention_mask[:, -kv_len:].all())):
        if q_len == 1:
            return None, False
        if past == 0:
            return None, True
        pad = None
    elif attention_mask is None:
        pad = None
    else:
        pad = attention_mask[:, -kv_len:].bool()
        if pad.shape[-1] < kv_len:  # a static cache's slots past the tokens: masked by causality below
            pad = F.pad(pad, (0, kv_len - pad.shape[-1]), value=True)
    mask = kj <= qi  # [q, kv]
    if pad is not None:
        # a query always sees itself, so fully padded rows stay finite
        mask = (mask & pad[:, None, :]) | (kj == qi)
        mask = mask[:, None]  # [B, 1, q, kv]
    return mask, False


class AttnResModel(AttnResPreTrainedModel):
    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.residual = scheme = build_scheme(config.residual, config.residual_dims(), config.residual_options())
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, scheme) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output_res = scheme.read_params(config.num_sublayers, config.hidden_size)  # the final read's
        self._records = None
        self.register_load_state_dict_pre_hook(_convert_legacy_hook)
        if scheme.uses_read_kernel:
            cpu_kernel.prepare()  # build the fused CPU read now, not inside the first forward
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        hd = self.config.hidden_size // self.config.num_attention_heads
        params = getattr(self.config, "rope_parameters", None) or {"rope_type": "default"}
        inv_freq = rope_inv_freq({**params, "rope_theta": self.config.rope_theta}, hd, position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """``hidden_states`` (with ``output_hidden_states``): the embedding, then the residual each
        later decoder layer reads (for standard: the running sum, as Llama), then the final normed
        output. ``attentions``: each layer's attention probabilities, computed explicitly."""
        _check_kwargs(kwargs, self)
        cache = _take_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and self._checkpointing():
            logger.warning_once("use_cache=True is incompatible with activation checkpointing: the KV cache is off")
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache()
        cache = cache if use_cache else None
        t = inputs_embeds.shape[1]
        # a static cache's length is a tensor (no sync, no recompile per step) and it returns all its slots
        past = cache.get_seq_length() if cache is not None else 0
        kv_len = cache.get_mask_sizes(t, 0)[0] if cache is not None else t
        if position_ids is None:
            position_ids = (torch.arange(t, device=inputs_embeds.device) + past)[None]
        rope = self._rope(position_ids, inputs_embeds.dtype)
        mask, causal = _attention_mask(attention_mask, t, past, kv_len, inputs_embeds.device)
        attentions = [] if self._flag(output_attentions, "output_attentions") else None
        mode = self.stream_mode(inputs_embeds)
        ctx = Pass(mode, self._records, Chain() if self._carries(mode) else None)

        with self._layer_inputs(self._flag(output_hidden_states, "output_hidden_states")) as inputs:
            state = self.residual.start(inputs_embeds, ctx)
            for layer in self.layers:
                state = layer(*state, ctx=ctx, rope=rope, mask=mask, causal=causal, cache=cache,
                              attentions=attentions)
            hidden = self.residual.finish(state, self.output_res, self.norm, ctx)
        out = BaseModelOutputWithPast(
            last_hidden_state=hidden, **{CACHE_FIELD: cache},
            hidden_states=None if inputs is None else (inputs_embeds, *inputs[1:], hidden),
            attentions=None if attentions is None else tuple(attentions),
        )
        return out if self._flag(return_dict, "return_dict") else out.to_tuple()

    def stream_mode(self, inputs_embeds: Tensor) -> Mode:
        """How this forward keeps its residual state: recorded reads take the plain stream; a no-grad
        forward of few tokens (a cached decode step) the bank; training and prefill of at least
        ``TWO_PHASE_MIN_TOKENS`` tokens the two-phase schedule (``config.attn_res_two_phase``)."""
        tokens = inputs_embeds.numel() // inputs_embeds.shape[-1]
        if self._records is not None:
            return Mode.STREAM
        if not torch.is_grad_enabled() and tokens < BANK_MAX_TOKENS:
            return Mode.BANK
        if self.config.attn_res_two_phase and tokens >= TWO_PHASE_MIN_TOKENS:
            return Mode.TWO_PHASE
        return Mode.STREAM

    @contextlib.contextmanager
    def record(self):
        """Collect a :class:`~attnres.residual.DepthRead` for every read (and the final output) of the
        forwards run inside the block. Recording computes extra statistics and syncs; use it for
        analysis, not for training steps."""
        outer, self._records = self._records, []
        try:
            yield self._records
        finally:
            self._records = outer

    def _carries(self, mode: Mode) -> bool:
        """Whether this forward's reads carry their sources' gradients (``attnres.ops.grads``): a forward with
        autograd, not recorded, and not under activation checkpointing (a recomputed layer would see the
        carriers of the whole pass)."""
        return (cpu_kernel.carry_enabled() and mode is not Mode.BANK and torch.is_grad_enabled()
                and self._records is None and not self._checkpointing())

    def _checkpointing(self) -> bool:
        """Whether this forward recomputes layers in backward (then the KV cache is off, as in HF)."""
        return self.training and torch.is_grad_enabled() and any(layer.gradient_checkpointing for layer in self.layers)

    def _flag(self, value: bool | None, name: str) -> bool:
        return bool(getattr(self.config, name, False) if value is None else value)

    @contextlib.contextmanager
    def _layer_inputs(self, enabled: bool):
        """Collect the un-normalised input of every decoder layer's attention read (or yield None):
        a hooked norm is never fused into the read, so a pre-hook on each ``input_layernorm`` sees h."""
        if not enabled:
            yield None
            return
        seen: list[Tensor] = []
        hooks = [layer.input_layernorm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
                 for layer in self.layers]
        try:
            yield seen
        finally:
            for h in hooks:
                h.remove()


def enable_activation_checkpointing(model: PreTrainedModel, use_reentrant: bool = False) -> None:
    """Recompute every decoder layer (AttnRes reads included) in backward: HF's
    ``activation_checkpointing_enable`` where the installed transformers has it (>= 5.24, where
    ``gradient_checkpointing_enable`` is a deprecated alias), else ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _convert_legacy_hook(module, state_dict, prefix, *args) -> None:
    convert_legacy_state_dict(state_dict, prefix)


class AttnResForCausalLM(AttnResPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.model = AttnResModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """``labels`` (same shape as ``input_ids``, -100 = ignore) give the next-token cross-entropy,
        averaged over the labelled tokens, or summed and divided by ``num_items_in_batch`` (HF Trainer's
        gradient-accumulation convention)."""
        _check_kwargs(kwargs, self)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=_take_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None if labels is None else _next_token_loss(logits, labels, num_items_in_batch)
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
            hidden_states=out.hidden_states, attentions=out.attentions,
        )
        return result if self.model._flag(return_dict, "return_dict") else result.to_tuple()


def _next_token_loss(logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None) -> Tensor:
    flat_logits = logits[:, :-1].flatten(0, 1).float()
    flat_labels = labels[:, 1:].flatten().to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
