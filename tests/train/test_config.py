"""TrainConfig: presets, YAML, --set coercion, and clear errors."""

import pytest

from attnres.train import PRESETS, ConfigError, load_config, parse_set
from attnres.train.config import allowed_keys, config_from_dict


def test_default_preset_is_the_reference_config():
    cfg = load_config("default")
    assert (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    ) == (256, 8, 8, 4, 704)
    assert (cfg.tokenizer, cfg.vocab_size, cfg.batch_size, cfg.seq_len) == ("bpe", 8192, 8, 256)
    assert (cfg.optimizer, cfg.lr, cfg.schedule, cfg.attn_res_num_blocks) == ("adamw", 1e-3, "cosine", 8)
    assert cfg.warmup_steps > 0


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds_a_valid_model_config(preset):
    cfg = load_config(preset)
    for residual in ("standard", "block", "full"):
        cfg.residual = residual
        cfg.validate()
    assert load_config("long").max_steps > load_config("default").max_steps > load_config("smoke").max_steps


def test_set_values_are_coerced_to_the_field_types():
    o = parse_set(
        [
            "lr=3e-4",
            "max_steps=1e3",
            "bf16=true",
            "probes=off",
            "sources=shakespeare,/x/a.txt",
            "betas=0.8,0.99",
            "attn_res_block_size=none",
            "residual=full",
            "num_threads=1",
        ]
    )
    assert o == {
        "lr": 3e-4,
        "max_steps": 1000,
        "bf16": True,
        "probes": False,
        "sources": ["shakespeare", "/x/a.txt"],
        "betas": (0.8, 0.99),
        "attn_res_block_size": None,
        "residual": "full",
        "num_threads": 1,
    }
    assert isinstance(o["max_steps"], int)
    cfg = load_config("smoke", overrides=o)
    assert cfg.lr == 3e-4 and cfg.residual == "full" and cfg.betas == (0.8, 0.99)


def test_unknown_key_error_lists_the_allowed_keys():
    with pytest.raises(ConfigError) as e:
        parse_set(["learning_rate=1"])
    msg = str(e.value)
    assert "'learning_rate'" in msg and all(k in msg for k in allowed_keys())


@pytest.mark.parametrize(
    "item, match",
    [
        ("max_steps=abc", "integer"),
        ("max_steps=2.5", "integer"),
        ("lr=fast", "number"),
        ("bf16=maybe", "boolean"),
        ("schedule=linear", "schedule must be one of"),
        ("lr=-1", "lr must be > 0"),
        ("residual=dense", "residual"),
        ("hidden_size=30", "divisible"),
        ("warmup_steps=1000", "warmup_steps"),
        ("betas=0.9", "2 values"),
        ("noequals", "key=value"),
        ("val_fraction=1.5", "val_fraction"),
        ("lr=nan", "lr must be finite, got nan"),
        ("lr=inf", "lr must be finite, got inf"),
        ("weight_decay=-1", "weight_decay must be >= 0"),
        ("weight_decay=nan", "weight_decay must be finite"),
        ("grad_clip=inf", "grad_clip must be finite"),
        ("betas=0.9,nan", "betas must be finite"),
        ("rms_norm_eps=0", "rms_norm_eps must be > 0"),
        ("muon_momentum=1", "muon_momentum must be in"),
        ("max_steps=3", "lower it with --set warmup_steps=N"),
        ("device=tpu", "device must be one of"),
        ("device=cuda:banana", "device must be one of"),
    ],
)
def test_bad_values_are_rejected_with_the_offending_value(item, match):
    with pytest.raises(ConfigError, match=match):
        load_config("smoke", overrides=parse_set([item]))


def test_yaml_overrides_preset_and_set_overrides_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: smoke\nlr: 0.002\nmax_steps: 50\nsources: [a.txt, b.txt]\n")
    cfg = load_config(None, f, parse_set(["max_steps=60"]))
    assert cfg.hidden_size == PRESETS["smoke"]["hidden_size"]  # the file's preset
    assert cfg.lr == 0.002 and cfg.max_steps == 60 and cfg.sources == ["a.txt", "b.txt"]
    assert load_config("default", f).hidden_size == 256  # an explicit preset wins over the file's


@pytest.mark.parametrize(
    "text, match",
    [
        ("lr: 1\nfoo: 2\n", "unknown config key 'foo'"),
        ("- a\n- b\n", "mapping"),
        ("lr: [1\n", "not valid YAML"),
    ],
)
def test_bad_yaml_files_give_clear_errors(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config("smoke", f)


def test_missing_yaml_and_unknown_preset_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("smoke", tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'huge'; allowed: smoke, default, long"):
        load_config("huge")


def test_saved_config_round_trips():
    cfg = load_config("smoke", overrides=parse_set(["betas=0.8,0.9", "sources=a,b"]))
    assert config_from_dict(cfg.to_dict()) == cfg


def test_seq_len_that_cannot_fit_in_memory_is_refused(monkeypatch):
    from attnres.train import config

    cfg = load_config("smoke")
    monkeypatch.setattr(config, "physical_memory", lambda: 8 * 2**30)
    cfg.validate()  # the smoke step is far below 8 GiB
    with pytest.raises(ConfigError, match="seq_len=100000 with batch_size=8 needs about .* RAM"):
        load_config("smoke", overrides=parse_set(["seq_len=100000"]))
    with pytest.raises(ConfigError, match="lower seq_len or batch_size"):
        load_config("smoke", overrides=parse_set(["seq_len=1000000", "probes=false"]))


def test_memory_estimate_grows_with_seq_len_and_probes():
    cfg = load_config("smoke")
    longer = load_config("smoke", overrides=parse_set(["seq_len=512"]))
    no_probes = load_config("smoke", overrides=parse_set(["seq_len=512", "probes=false"]))
    assert cfg.memory_estimate() < no_probes.memory_estimate() < longer.memory_estimate()


def test_cuda_without_cuda_is_a_config_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="device 'cuda': CUDA is not available"):
        load_config("smoke", overrides=parse_set(["device=cuda"]))


def test_user_errors_are_value_errors():
    from attnres.train.config import UserError

    assert issubclass(ConfigError, UserError) and issubclass(UserError, ValueError)
