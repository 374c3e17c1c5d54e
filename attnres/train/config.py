"""TrainConfig: everything one training run depends on, presets, YAML files and ``key=value`` overrides.

Precedence (later wins): the dataclass defaults < the preset < a YAML file < ``--set key=value``
< the CLI's dedicated flags (``--residual``, ``--max-steps``, ...).
"""

from __future__ import annotations

import inspect
import math
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

from ..models.configuration import AttnResConfig
from ..residual.keys import Key
from ..residual.registry import REGISTRY, RESIDUALS, SCHEMES, all_keys  # the registry's names, in order

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
TOKENIZERS = ("bpe", "byte", "init")  # init: the init model's own tokenizer (its directory's tokenizer.json)


class UserError(ValueError):
    """Bad input from the user (a flag, a config value or file, a run directory, a text file).

    The ``attnres`` command prints these as one line ``attnres: error: ...``; any other exception is
    a bug and keeps its traceback. A ValueError so that callers catching ValueError still do."""


class ConfigError(UserError):
    """A user-facing configuration error (bad key, value or file)."""


DEVICES = ("cpu", "cuda", "cuda:N", "mps")


def physical_memory() -> int | None:
    """Bytes of physical RAM (``os.sysconf``), or None where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


# --- the model's keys: AttnResConfig's signature (decoder-wide keys) plus every scheme's keys (the registry),
# flat, so run.json / trainer_state of older versions (which declared a subset of them flat) still load and
# ``--set key=value`` / YAML keep one namespace. Derived, not re-declared: a key added to AttnResConfig or to
# a scheme is a TrainConfig key with the same name, default and type.
_NOT_MODEL_KEYS = {
    "vocab_size",  # TrainConfig's vocab_size is the BPE target; the model's is the tokenizer's length
    "use_cache",  # always True (generation after training)
}
# where the trainer's default differs from AttnResConfig's
_MODEL_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": 4,
    "max_position_embeddings": None,  # None: max(2048, seq_len)
}
_MODEL_TYPES: dict[str, Any] = {"num_key_value_heads": int, "max_position_embeddings": int | None}


def _model_fields() -> list[tuple[str, Any, Any]]:
    sig = inspect.signature(AttnResConfig.__init__)
    hints = typing.get_type_hints(AttnResConfig.__init__)
    out = []
    for name, p in sig.parameters.items():
        if name == "self" or p.kind is not p.POSITIONAL_OR_KEYWORD or name in _NOT_MODEL_KEYS:
            continue
        default = _MODEL_DEFAULTS.get(name, p.default)
        out.append((name, _MODEL_TYPES.get(name, hints[name]), field(default=default)))
    return out


_KIND_TYPES = {"int": int, "float": float, "bool": bool, "choice": str}


def _scheme_fields() -> list[tuple[str, Any, Any]]:
    """One field per scheme key (a key shared by several schemes, e.g. ``hyper_streams``, is one field; its
    owners agree on the default and kind)."""
    keys: dict[str, Key] = {}
    for e in SCHEMES:
        for k in e.keys:
            if k.name in keys and (keys[k.name].default, keys[k.name].kind) != (k.default, k.kind):
                raise TypeError(f"scheme key {k.name!r}: its schemes disagree on the default or kind")
            keys.setdefault(k.name, k)
    out = []
    for k in keys.values():
        tp = _KIND_TYPES[k.kind]
        out.append((k.name, tp | None if k.optional else tp, field(default=k.default)))
    return out


MODEL_KEYS: tuple[str, ...] = tuple(name for name, _, _ in _model_fields())  # AttnResConfig's, in its order
SCHEME_KEYS: dict[str, list[str]] = all_keys()  # scheme key -> the schemes that own it
_ModelKeys = make_dataclass("_ModelKeys", _model_fields() + _scheme_fields())
_ModelKeys.__doc__ = "The model's keys of :class:`TrainConfig` (AttnResConfig's and every scheme's)."


@dataclass
class TrainConfig(_ModelKeys):
    """One training run. Units: ``*_steps`` count optimizer steps; ``batch_size`` and ``seq_len`` are
    per micro-batch, so a step sees ``batch_size * seq_len * grad_accum`` tokens.

    The model's keys come first: every :class:`AttnResConfig` argument (``hidden_size``, ``rope_theta``,
    ``attn_res_block_layers``, ...; :data:`MODEL_KEYS`) and every residual scheme's keys
    (``attn_res_window``, ``hyper_streams``, ...; :data:`SCHEME_KEYS`), with AttnResConfig's / the registry's
    defaults except ``num_key_value_heads`` (4) and ``max_position_embeddings`` (None: max(2048, seq_len)).
    The model is built with the keys of the chosen ``residual`` only; :func:`load_config` refuses a
    non-default key of a scheme that is not chosen (compare: not one of its arms), since a compare's arms
    share one config."""

    # --- data (attnres.data.prepare_data)
    sources: list[str] = field(default_factory=lambda: ["shakespeare"])
    tokenizer: str = "bpe"  # "bpe" (trained on the corpus), "byte", or "init" (the init model's own; needs init)
    vocab_size: int = 8192  # BPE target vocabulary; ignored by the byte and init tokenizers
    # corpus cache; None: $ATTNRES_DATA, else $XDG_CACHE_HOME/attnres or ~/.cache/attnres. validate()
    # makes it absolute, so run.json records where the data is, whatever the current directory
    data_dir: str | None = None
    val_fraction: float = 0.05
    split_seed: int = 0
    # --- initialisation: a saved AttnResForCausalLM directory (save_pretrained; `attnres upcycle`'s output, a
    # run's checkpoint/) whose weights and architecture the run starts from instead of a fresh model; None: fresh.
    # load_config takes the model keys the user did not set from its config.json (resolve_init)
    init: str | None = None
    # --- optimization
    optimizer: str = "adamw"  # "muon": torch.optim.Muon on 2-D hidden weights, AdamW on the rest
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    muon_momentum: float = 0.95
    warmup_steps: int = 15
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd: linear decay over the last fraction of max_steps
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accum: int = 1
    batch_size: int = 8
    seq_len: int = 256
    max_steps: int = 150
    # --- bookkeeping
    eval_every: int = 50
    eval_batches: int = 16  # validation batches per evaluation (None/0: the whole split)
    checkpoint_every: int = 50
    seed: int = 0  # model init and data order
    bf16: bool = False  # torch.autocast("cpu"/"cuda", bfloat16) around forward; params stay fp32
    # recompute each decoder layer (AttnRes reads included) in backward: less activation memory, more compute
    activation_checkpointing: bool = False
    probes: bool = True  # record attnres.analysis.collect_probes at every evaluation
    probe_batch_size: int = 4
    device: str = "cpu"
    num_threads: int | None = None  # torch.set_num_threads for this run; None: torch's default
    # --- parallelism (attnres.distributed; launch with torchrun, README "Several processes"). The data-
    # parallel degree is world_size / pipeline_stages; batch_size is the *global* micro-batch, split
    # over the data-parallel ranks, so losses equal a single-process run's
    parallel: str = "ddp"  # over the data-parallel ranks: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2)
    pipeline_stages: int = 1  # P: ranks per pipeline
    pipeline_virtual: int = 1  # V: stages per pipeline rank (interleaved / V-shape schedules)
    pipeline_schedule: str = "1F1B"  # a torch.distributed.pipelining schedule (attnres.distributed.SCHEDULES)
    pipeline_microbatches: int = 0  # microbatches per step through the pipeline; 0: P * V
    pipeline_cache: bool = True  # Block/Full: ship only the blocks the receiving rank lacks (PAPER §4.1)

    def validate(self) -> TrainConfig:
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v < 0 or (v == 0 and not allow_zero):
                raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

        for name, allowed in (
            ("residual", RESIDUALS),
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("tokenizer", TOKENIZERS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for f in fields(self):  # nan passes every comparison below, inf breaks the optimizer
            v = getattr(self, f.name)
            values = v if isinstance(v, (tuple, list)) else (v,)
            if any(isinstance(x, float) and not math.isfinite(x) for x in values):
                raise ConfigError(f"{f.name} must be finite, got {v!r}")
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "attn_res_num_blocks",
            "vocab_size",
            "grad_accum",
            "batch_size",
            "seq_len",
            "max_steps",
            "eval_every",
            "checkpoint_every",
            "lr",
            "rms_norm_eps",
            "probe_batch_size",
            "rope_theta",
            "initializer_range",
        ):
            positive(name)
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eps", "split_seed"):
            positive(name, allow_zero=True)
        if self.eval_batches is not None:
            positive("eval_batches", allow_zero=True)
        for name in ("attn_res_block_size", "attn_res_block_layers", "max_position_embeddings"):
            if getattr(self, name) is not None:
                positive(name)
        if self.max_position_embeddings is not None and self.seq_len > self.max_position_embeddings:
            raise ConfigError(
                f"seq_len ({self.seq_len}) must be <= max_position_embeddings ({self.max_position_embeddings})"
            )
        for name in SCHEME_KEYS:  # every scheme's keys, chosen or not (the chosen one's again with the model)
            check_scheme_value(name, getattr(self, name))
        if self.num_threads is not None:
            positive("num_threads")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"muon_momentum must be in [0, 1), got {self.muon_momentum!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.sources:
            raise ConfigError("sources is empty: give at least one corpus name or text file")
        if self.tokenizer == "init" and self.init is None:
            raise ConfigError("tokenizer=init tokenizes the corpus with the init model's own tokenizer: give "
                              "init=DIR (attnres train --init DIR)")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"warmup_steps ({self.warmup_steps}) must be <= max_steps ({self.max_steps}); "
                f"lower it with --set warmup_steps=N (N <= {self.max_steps}) or raise max_steps"
            )
        from ..data._io import resolve_data_dir
        from ..distributed.plan import check_keys

        check_keys(self)  # parallel / pipeline_* values; the job's size is checked when it starts
        self.data_dir = str(resolve_data_dir(self.data_dir))
        self.model_config()  # AttnResConfig checks the architecture (head divisibility, ...)
        self.check_device()
        self.check_memory()
        return self

    def check_device(self) -> None:
        """``device`` names a device this machine has (a clear error instead of torch's assertion)."""
        import torch

        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}") from None
        if dev.type == "cpu":
            return
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
                raise ConfigError(f"device {self.device!r}: CUDA is not available ({why}); use device=cpu")
            n = torch.cuda.device_count()
            if dev.index is not None and dev.index >= n:
                raise ConfigError(f"device {self.device!r}: this machine has {n} CUDA device(s), cuda:0..{n - 1}")
            return
        if dev.type == "mps":
            if not torch.backends.mps.is_available():
                raise ConfigError(f"device {self.device!r}: MPS is not available here; use device=cpu")
            return
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")

    def memory_estimate(self) -> int:
        """A rough upper estimate, in bytes, of the memory one training step (and the probes at an
        evaluation) needs: fp32 activations kept for backward, the logits, parameters and AdamW
        state, and, with probes on, the materialised attention weights of every layer."""
        b, t, h, n = self.batch_size, self.seq_len, self.hidden_size, self.num_hidden_layers
        per_token_layer = 12 * h + 4 * self.intermediate_size + 4 * h * n  # + the residual stream reads
        activations = 4 * b * t * n * per_token_layer
        logits = 4 * 3 * b * t * self.vocab_size
        params = n * (4 * h * h + 3 * h * self.intermediate_size) + 2 * h * self.vocab_size
        total = activations + logits + 16 * params
        if self.probes:
            total += 4 * self.probe_batch_size * self.num_attention_heads * t * t * n
        return total

    def check_memory(self) -> None:
        """Refuse a ``seq_len``/``batch_size`` whose step cannot fit in this machine's memory (it would
        swap or spend minutes inside one step, deaf to Ctrl-C, before failing)."""
        if self.device.startswith("cuda"):
            import torch

            limit = torch.cuda.get_device_properties(torch.device(self.device).index or 0).total_memory
            where = "GPU memory"
        else:
            limit, where = physical_memory(), "RAM"
        need = self.memory_estimate()
        if limit is not None and need > limit:
            probes = " (probes materialise seq_len x seq_len attention weights; probes=false drops that)"
            raise ConfigError(
                f"seq_len={self.seq_len} with batch_size={self.batch_size} needs about {_gb(need)} of memory "
                f"per step{probes if self.probes else ''}, more than this machine's {_gb(limit)} of {where}; "
                f"lower seq_len or batch_size"
            )

    def model_config(self, vocab_size: int | None = None, residual: str | None = None) -> AttnResConfig:
        """The :class:`AttnResConfig` of this run (``vocab_size``: the tokenizer's length; ``residual``: another
        scheme than ``self.residual``, as a compare arm). Every AttnResConfig key, and the keys of the chosen
        scheme only; ``attn_res_block_size`` / ``attn_res_block_layers`` only for ``block`` (Full is S=1,
        the other schemes have no blocks), so the arms of a compare share them."""
        residual = residual or self.residual
        kw = {name: getattr(self, name) for name in MODEL_KEYS}
        kw["residual"] = residual
        if kw["max_position_embeddings"] is None:
            kw["max_position_embeddings"] = max(2048, self.seq_len)
        if residual != "block":
            kw["attn_res_block_size"] = kw["attn_res_block_layers"] = None
        if residual in REGISTRY:
            kw.update({k.name: getattr(self, k.name) for k in REGISTRY[residual].keys})
        try:
            return AttnResConfig(vocab_size=vocab_size or self.vocab_size, use_cache=True, **kw)
        except ValueError as e:
            raise ConfigError(f"invalid model config: {e}") from None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# Presets only list what differs from the TrainConfig defaults (the reference "default").
PRESETS: dict[str, dict[str, Any]] = {
    # tiny and fast: the 3-arm compare runs in well under 2 minutes on a 2-core CPU. One thread:
    # a model this small gains nothing from two, and on a shared, loaded machine two OpenMP threads
    # ran the smoke arm 6x slower (45.7 s vs 7.8 s wall, load average 5 on 2 cores)
    "smoke": dict(
        num_threads=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=176,
        attn_res_num_blocks=2,
        tokenizer="byte",
        batch_size=8,
        seq_len=64,
        max_steps=60,
        warmup_steps=6,
        eval_every=20,
        eval_batches=4,
        checkpoint_every=30,
    ),
    # the reference config (PAPER §11 prototype): d=256 x 8 layers, N=8, bpe 8192, batch 8 x 256,
    # AdamW 1e-3 warmup + cosine. Measured on the project's shared 2-core CPU (1 thread, load ~3):
    # 1.42 / 1.53 / 1.68 s per step for standard / block / full, 16 eval batches ~9 s; so 150 steps
    # (0.31M tokens) and 3 evaluations take ~4.3 min per arm, ~13 min for the 3-arm compare. One
    # thread, because two OpenMP threads on a core another process is using ran 8-19 s per step
    # (0.9 s when both cores were free): on an idle machine `--set num_threads=2 --set max_steps=280`
    # gives about the same wall time with nearly twice the tokens.
    "default": dict(num_threads=1),
    # more tokens: 1500 steps x 2048 tokens = 3.1M tokens (~40 min per arm at 1 thread)
    "long": dict(
        num_threads=1, max_steps=1500, warmup_steps=75, eval_every=100, eval_batches=32, checkpoint_every=250
    ),
}


def allowed_keys() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _unknown(keys, where: str) -> None:
    bad = sorted(set(keys) - set(allowed_keys()))
    if bad:
        raise ConfigError(
            f"unknown config key{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} in {where}; "
            f"allowed: {', '.join(allowed_keys())}"
        )


_TYPES = typing.get_type_hints(TrainConfig)


def _strip_optional(tp) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{key} must be a boolean (true/false), got {value!r}")


def _scalar(key: str, tp, value: Any):
    if tp is bool:
        return _parse_bool(key, value)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.strip().replace("_", ""))
            except ValueError:
                pass
            else:
                if f.is_integer():
                    return int(f)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def check_scheme_value(name: str, value: Any) -> Any:
    """``value`` if one of the schemes owning key ``name`` accepts it (their bounds may differ, e.g.
    ``hyper_streams`` <= 5 for mhc_lite only); else a one-line :class:`ConfigError` (the first owner's)."""
    errors = []
    for residual in SCHEME_KEYS[name]:
        key = next(k for k in REGISTRY[residual].keys if k.name == name)
        try:
            return key.validate(value)
        except ValueError as e:
            errors.append(str(e))
    raise ConfigError(f"{errors[0]} ({name} is a key of residual={'/'.join(SCHEME_KEYS[name])})")


def check_scheme_keys(cfg: TrainConfig, keys: Iterable[str], residuals: Iterable[str] | None = None) -> None:
    """Refuse, in one line, a scheme key among ``keys`` (what the user set) that no scheme of ``residuals``
    (default: ``cfg.residual``; compare: its arms) owns, unless it is at its default."""
    residuals = tuple(residuals or (cfg.residual,))
    for name in keys:
        owners = SCHEME_KEYS.get(name)
        if owners is None or set(owners) & set(residuals):
            continue
        value = getattr(cfg, name)
        if value == next(k.default for k in REGISTRY[owners[0]].keys if k.name == name):
            continue
        takes = sorted({k.name for r in residuals if r in REGISTRY for k in REGISTRY[r].keys})
        which = f"residual={residuals[0]!r}" if len(residuals) == 1 else f"the arms {', '.join(residuals)}"
        raise ConfigError(
            f"{name}={value!r} is a key of residual={'/'.join(owners)}, not of {which} "
            f"({'it takes' if len(residuals) == 1 else 'they take'}: {', '.join(takes) or 'no scheme keys'})"
        )


def coerce(key: str, value: Any) -> Any:
    """Convert ``value`` (a YAML value or a ``--set`` string) to the type of field ``key``; a scheme key's
    value is also checked against its scheme (one line)."""
    _unknown([key], "the config")
    out = _coerce(key, value)
    if key in SCHEME_KEYS:
        check_scheme_value(key, out)
    return out


def _coerce(key: str, value: Any) -> Any:
    tp, optional = _strip_optional(_TYPES[key])
    if value is None or (
        optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")
    ):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty/None")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *rest) = typing.get_args(tp)
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} must be a list (comma-separated on the command line), got {value!r}")
        out = [_scalar(key, item_tp, v) for v in items]
        if origin is tuple:
            if len(out) != len(typing.get_args(tp)):
                raise ConfigError(f"{key} needs {len(typing.get_args(tp))} values, got {value!r}")
            return tuple(out)
        return out
    return _scalar(key, tp, value)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["lr=3e-4", "residual=full"]`` -> typed overrides."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key] = coerce(key, value)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def load_config(
    preset: str | None = "default",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    residuals: Iterable[str] | None = None,
) -> TrainConfig:
    """Build a validated :class:`TrainConfig`: preset, then YAML file, then ``overrides``.

    A YAML file may name its own ``preset:``, used when ``preset`` is None. A scheme key set by the file
    or ``overrides`` must belong to ``residual`` (or to one of ``residuals``: a compare's arms) unless it
    is at its default (:func:`check_scheme_keys`).
    """
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = read_yaml(config_file)
        file_preset = file_values.pop("preset", None)
        preset = preset or file_preset
        _unknown(file_values, str(config_file))
        file_values = {k: coerce(k, v) for k, v in file_values.items()}
    preset = preset or "default"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    overrides = dict(overrides or {})
    _unknown(overrides, "the overrides")
    cfg = replace(TrainConfig(), **{**PRESETS[preset], **file_values})
    cfg = replace(cfg, **{k: coerce(k, v) for k, v in overrides.items()})
    if cfg.init is not None:
        if residuals is not None:  # compare / ablate: each arm builds its own scheme's model
            raise ConfigError("init starts one run from a saved model (attnres train --init); compare and "
                              "ablate arms each build their own scheme's model: leave init out")
        cfg = resolve_init(cfg, [*file_values, *overrides])
    check_scheme_keys(cfg, [*PRESETS[preset], *file_values, *overrides], residuals)
    return cfg.validate()


def init_model_config(path: str | Path) -> AttnResConfig:
    """The :class:`AttnResConfig` of the saved model in ``path`` (``init``); a one-line :class:`ConfigError` if
    ``path`` is missing or holds no attnres model."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"init: {path} does not exist")
    if not (path / "config.json").is_file():
        if (path / "checkpoint" / "config.json").is_file():  # a run directory: its checkpoint
            return init_model_config(path / "checkpoint")
        raise ConfigError(f"init: {path} is not a model directory (no config.json)")
    from .checkpoint import attnres_config_json

    d = attnres_config_json(path, ConfigError, "init: ")
    try:
        return AttnResConfig.from_dict(d)
    except Exception as e:  # noqa: BLE001 - a bad config.json surfaces as many exception types
        raise ConfigError(f"init: invalid config.json in {path}: {str(e).splitlines()[0]}") from None


def init_dir(path: str | Path) -> Path:
    """The model directory of ``init`` (``path``, or ``path/checkpoint`` for a run directory)."""
    path = Path(path)
    return path / "checkpoint" if not (path / "config.json").is_file() and (path / "checkpoint").is_dir() else path


def resolve_init(cfg: TrainConfig, user_keys: Iterable[str]) -> TrainConfig:
    """``cfg`` with the model keys of the model in ``cfg.init`` (an absolute path): a model key in
    ``user_keys`` (what a YAML file or ``--set`` gave) must equal the saved model's (one-line
    :class:`ConfigError` naming the first that differs); the others are taken from it."""
    path = Path(cfg.init).expanduser().absolute()
    saved = init_model_config(path)
    user = set(user_keys)
    residual = saved.residual
    if "residual" in user and cfg.residual != residual:
        raise ConfigError(f"init: residual={cfg.residual!r} differs from the model in {path} (residual={residual!r})")
    names = [n for n in MODEL_KEYS if n != "residual"]
    if residual in REGISTRY:
        names += [k.name for k in REGISTRY[residual].keys]
    if residual != "block":  # the model has no blocks; the config's keys stay (check_scheme_keys ignores them)
        names = [n for n in names if n not in ("attn_res_block_size", "attn_res_block_layers")]
    values: dict[str, Any] = {"residual": residual, "init": str(path)}
    for name in names:
        value = getattr(saved, name, None)
        if name in user and getattr(cfg, name) != value:
            if not (name == "max_position_embeddings" and getattr(cfg, name) is None):
                raise ConfigError(f"init: {name}={getattr(cfg, name)!r} differs from the model in {path} "
                                  f"({name}={value!r}); leave it out to take the model's")
        values[name] = value
    return replace(cfg, **values)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a saved config (``TrainConfig.to_dict``); unknown keys are an error."""
    _unknown(d, "the saved config")
    return replace(TrainConfig(), **{k: coerce(k, v) for k, v in d.items()})


def config_diff(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    da, db = a.to_dict(), b.to_dict()
    return {k: (da[k], db[k]) for k in da if da[k] != db[k]}


__all__ = [
    "MODEL_KEYS",
    "PRESETS",
    "SCHEME_KEYS",
    "ConfigError",
    "TrainConfig",
    "UserError",
    "allowed_keys",
    "check_scheme_keys",
    "coerce",
    "config_diff",
    "config_from_dict",
    "init_dir",
    "init_model_config",
    "load_config",
    "parse_set",
    "read_yaml",
    "resolve_init",
]
