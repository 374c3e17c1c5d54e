"""AttnResConfig: a Llama-style decoder config plus the residual scheme."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..residual.keys import ModelDims
from ..residual.registry import REGISTRY, all_keys, entry, options_for
from . import rope


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


_DEFAULT_THETA = 10000.0


def _rope_parameters(kwargs: dict, rope_theta: float) -> dict:
    """The standardized ``rope_parameters`` from ``kwargs`` (popped: ``rope_parameters``, or the legacy
    ``rope_scaling``) and the ``rope_theta`` argument."""
    params, scaling = kwargs.pop("rope_parameters", None), kwargs.pop("rope_scaling", None)
    if params is not None and scaling is not None and rope.standardize(params, rope_theta) \
            != rope.standardize(scaling, rope_theta):
        raise ValueError(f"rope_parameters={params!r} and rope_scaling={scaling!r} disagree; give one")
    params = params if params is not None else scaling
    theirs = params.get("rope_theta") if isinstance(params, dict) else None
    if theirs is not None and rope_theta != _DEFAULT_THETA and float(theirs) != float(rope_theta):
        raise ValueError(f"rope_theta={rope_theta!r} differs from rope_parameters' rope_theta={theirs!r}; give one")
    return rope.standardize(params, rope_theta)


class AttnResConfig(PretrainedConfig):
    r"""Configuration of :class:`AttnResForCausalLM`.

    The decoder keys are Llama's (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ...), so a
    ``residual="standard"`` model *is* a Llama. The residual keys:

    - ``residual``: a name of ``attnres.residual.RESIDUALS``: ``"standard"`` (PreNorm sum), ``"full"``
      (Full AttnRes), ``"block"`` (Block AttnRes), or a comparison scheme (``"denseformer"``, ``"hc"``,
      ``"mhc"``, ``"mhc_lite"``, ``"delta"``, ``"residual_scale"``, ``"realformer"``, ``"depth_mha"``).
    - ``attn_res_block_size``: sublayers per block, the paper's S. Each decoder layer has two
      sublayers (attention, MLP), so a model has L = 2 * num_hidden_layers sublayers. S = 1 is Full.
    - ``attn_res_num_blocks``: the paper's N; used when no block size is given, as
      S = ceil(L / N) (so the model has at most N blocks; the last one is shorter when N does not
      divide L). Default 8.
    - ``attn_res_block_layers``: the Kimi-K3 / HF ``attn_res_block_size`` convention, block size in
      *decoder layers*; S = 2 * attn_res_block_layers.
    - ``attn_res_final_aggregation``: if True (default) the final hidden state is one more AttnRes
      read over all sources, with its own pseudo-query and key-norm gain (our reading of PAPER §1
      "Final output"); if False it is the plain sum of all sources.
    - ``attn_res_two_phase``: Block AttnRes computes the inter-block terms of each layer's reads at
      once (PAPER Alg. 1) for training and prefill of at least 64 tokens (default True); the result
      is the same function.
    - The chosen scheme's own keys (``attnres.residual.REGISTRY[residual].keys``: name, default, unit,
      allowed values; README "Config units"), e.g. the Table 4 ablations of Full/Block
      (``attn_res_query``, ``attn_res_weights``, ``attn_res_key_norm``, ``attn_res_window``,
      ``attn_res_heads``, ``attn_res_head_norm``) or ``hyper_streams`` for HC. Only the chosen scheme's
      keys become attributes; another scheme's key is an error unless it is at its default.

    RoPE: ``rope_theta`` is the base; ``rope_parameters`` (a keyword, transformers 5's convention; the legacy
    ``rope_scaling`` is read as it) may give a scaled RoPE: ``{"rope_type": "linear", "factor": f}`` or
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` (:mod:`attnres.models.rope`). The config always holds the complete
    dict (``rope_type`` and ``rope_theta`` included; its ``rope_theta`` wins over a default ``rope_theta``
    argument, and a different explicit one is an error); another type is a one-line ``ValueError``.

    The keys keep what was given (a saved config stays valid when ``num_hidden_layers`` changes on
    load); :attr:`block_size` is the resolved S (1 for "full", None for schemes without blocks).
    """

    model_type = "attnres"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 256,
        intermediate_size: int = 704,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        residual: str = "block",
        attn_res_block_size: int | None = None,
        attn_res_num_blocks: int = 8,
        attn_res_block_layers: int | None = None,
        attn_res_final_aggregation: bool = True,
        attn_res_two_phase: bool = True,
        **kwargs,
    ):
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.intermediate_size = _positive_int("intermediate_size", intermediate_size)
        self.num_hidden_layers = _positive_int("num_hidden_layers", num_hidden_layers)
        self.num_attention_heads = _positive_int("num_attention_heads", num_attention_heads)
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        self.num_key_value_heads = _positive_int("num_key_value_heads", num_key_value_heads)
        self.max_position_embeddings = _positive_int("max_position_embeddings", max_position_embeddings)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({num_key_value_heads}) must divide num_attention_heads "
                f"({num_attention_heads})"
            )
        if (hidden_size // num_attention_heads) % 2:
            raise ValueError(f"head dim hidden_size/num_attention_heads must be even for RoPE, got "
                             f"{hidden_size}/{num_attention_heads}")
        if not rms_norm_eps >= 0:
            raise ValueError(f"rms_norm_eps must be >= 0, got {rms_norm_eps!r}")
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = _rope_parameters(kwargs, rope_theta)
        self.rope_theta = self.rope_parameters["rope_theta"]
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        entry(residual)  # a registered name, or a one-line error listing them
        self.residual = residual
        scheme_keys = all_keys()
        given = {name: kwargs.pop(name) for name in list(kwargs) if name in scheme_keys}
        for name, value in options_for(residual, given).items():
            setattr(self, name, value)
        self.attn_res_num_blocks = _positive_int("attn_res_num_blocks", attn_res_num_blocks)
        if attn_res_block_layers is not None:
            _positive_int("attn_res_block_layers", attn_res_block_layers)
        self.attn_res_block_layers = attn_res_block_layers
        self.attn_res_final_aggregation = bool(attn_res_final_aggregation)
        self.attn_res_two_phase = bool(attn_res_two_phase)
        self.attn_res_block_size = attn_res_block_size
        self._resolve_block_size()  # validates the combination now
        self.residual_scheme()  # and the scheme's keys against the model (e.g. heads dividing hidden_size)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_hidden_layers

    def residual_options(self) -> dict:
        """The chosen scheme's keys and their values (defaults where unset)."""
        return {k.name: getattr(self, k.name, k.default) for k in REGISTRY[self.residual].keys}

    def residual_dims(self) -> ModelDims:
        """What the scheme may know about this model."""
        return ModelDims(self.num_sublayers, self.hidden_size, self.num_attention_heads, self.rms_norm_eps,
                         self.block_size, self.attn_res_final_aggregation)

    def residual_scheme(self):
        """The residual scheme this config describes (configuration only; no parameters)."""
        from ..residual.registry import build

        return build(self.residual, self.residual_dims(), self.residual_options())

    @property
    def block_size(self) -> int | None:
        """The paper's S in sublayers, resolved from the keys above (None for "standard")."""
        return self._resolve_block_size()

    def _resolve_block_size(self) -> int | None:
        block_size = self.attn_res_block_size
        if block_size is not None:
            _positive_int("attn_res_block_size", block_size)
        layers = self.attn_res_block_layers
        if block_size is not None and layers is not None and block_size != 2 * layers:
            raise ValueError(
                f"attn_res_block_size={block_size} (sublayers) contradicts attn_res_block_layers={layers} "
                f"(decoder layers = {2 * layers} sublayers); give one of them"
            )
        if self.residual not in ("full", "block"):
            return None
        if self.residual == "full":
            if block_size not in (None, 1):
                raise ValueError(f"residual='full' has block size 1, got attn_res_block_size={block_size}")
            return 1
        if block_size is not None:
            return block_size
        if layers is not None:
            return 2 * layers
        return -(-self.num_sublayers // self.attn_res_num_blocks)
