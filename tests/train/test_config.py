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


# ----------------------------------------------------------------------------- the model's keys (issue 11)


def test_every_model_and_scheme_key_is_a_config_key():
    import inspect

    from attnres.models import AttnResConfig
    from attnres.residual.registry import all_keys

    own = set(inspect.signature(AttnResConfig.__init__).parameters) - {"self", "kwargs", "vocab_size", "use_cache"}
    assert own | set(all_keys()) <= set(allowed_keys())


def test_set_rope_theta_and_block_layers_reach_the_model():
    cfg = load_config("smoke", overrides=parse_set(["rope_theta=5e5", "attn_res_block_layers=2"]))
    assert cfg.rope_theta == 5e5 and cfg.attn_res_block_layers == 2
    mc = cfg.model_config(vocab_size=257)
    assert mc.rope_theta == 5e5 and mc.attn_res_block_layers == 2 and mc.block_size == 4
    assert cfg.to_dict()["rope_theta"] == 5e5  # recorded in run.json / trainer_state
    # the other arms of a compare share the config: no blocks outside "block"
    assert cfg.model_config(residual="full").block_size == 1
    assert cfg.model_config(residual="standard").attn_res_block_layers is None


@pytest.mark.parametrize(
    "items, attr, value",
    [
        (["residual=block", "attn_res_window=3"], "attn_res_window", 3),
        (["residual=hc", "hyper_streams=2"], "hyper_streams", 2),
        (["residual=denseformer", "denseformer_granularity=sublayer"], "denseformer_granularity", "sublayer"),
        (["residual=residual_scale", "residual_scale_init=0.5"], "residual_scale_init", 0.5),
    ],
)
def test_a_scheme_key_reaches_the_model(items, attr, value):
    cfg = load_config("smoke", overrides=parse_set(items))
    assert getattr(cfg, attr) == value and getattr(cfg.model_config(), attr) == value


def test_a_scheme_key_in_a_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: smoke\nresidual: mhc\nhyper_streams: 3\nmhc_sinkhorn_iters: 5\n")
    cfg = load_config(None, f)
    assert (cfg.model_config().hyper_streams, cfg.model_config().mhc_sinkhorn_iters) == (3, 5)


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_is_one_line_naming_the_model_and_scheme_keys():
    with pytest.raises(ConfigError) as e:
        parse_set(["attn_res_windw=3"])
    msg = _one_line(e)
    assert "'attn_res_windw'" in msg and "attn_res_window" in msg and "rope_theta" in msg and "hyper_streams" in msg


@pytest.mark.parametrize(
    "items, match",
    [
        (["residual=standard", "attn_res_window=3"],
         r"attn_res_window=3 is a key of residual=block/full, not of residual='standard'"),
        (["residual=block", "hyper_streams=2"],
         r"hyper_streams=2 is a key of residual=hc/mhc/mhc_lite, not of residual='block' \(it takes: attn_res_"),
        (["residual=full", "attn_res_query=bogus"], r"attn_res_query must be one of 'static'"),
        (["residual=mhc_lite", "hyper_streams=9"], r"hyper_streams must be an int >= 1 and <= 5, got 9"),
        (["rope_theta=0"], r"rope_theta must be > 0"),
        (["attn_res_block_layers=0"], r"attn_res_block_layers must be > 0"),
        (["attn_res_block_layers=2", "attn_res_block_size=3"], r"contradicts attn_res_block_layers=2"),
        (["max_position_embeddings=32"], r"seq_len \(64\) must be <= max_position_embeddings \(32\)"),
    ],
)
def test_bad_scheme_and_model_keys_are_one_line_errors(items, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config("smoke", overrides=parse_set(items))
    _one_line(e)


def test_another_schemes_key_at_its_default_is_accepted():
    assert load_config("smoke", overrides=parse_set(["residual=standard", "hyper_streams=4"])).hyper_streams == 4


# today's TrainConfig.to_dict(), as run.json and trainer_state hold it (before the model keys were derived)
OLD_SAVED = {
    "residual": "block", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 176, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
    "attn_res_block_size": None, "attn_res_num_blocks": 2, "attn_res_final_aggregation": True,
    "sources": ["shakespeare"], "tokenizer": "byte", "vocab_size": 8192, "data_dir": "/tmp/attnres-data",
    "val_fraction": 0.05, "split_seed": 0, "optimizer": "adamw", "lr": 0.001, "weight_decay": 0.1,
    "betas": [0.9, 0.95], "eps": 1e-08, "muon_momentum": 0.95, "warmup_steps": 6, "schedule": "cosine",
    "decay_fraction": 0.2, "min_lr_ratio": 0.1, "grad_clip": 1.0, "grad_accum": 1, "batch_size": 8,
    "seq_len": 64, "max_steps": 60, "eval_every": 20, "eval_batches": 4, "checkpoint_every": 30, "seed": 0,
    "bf16": False, "activation_checkpointing": False, "probes": True, "probe_batch_size": 4, "device": "cpu",
    "num_threads": 1, "parallel": "ddp", "pipeline_stages": 1, "pipeline_virtual": 1,
    "pipeline_schedule": "1F1B", "pipeline_microbatches": 0, "pipeline_cache": True,
}


def test_an_old_saved_config_loads_and_resumes_unchanged():
    from attnres.train.loop import check_resumable

    old = config_from_dict(OLD_SAVED)
    assert old.rope_theta == 10000.0 and old.attn_res_block_layers is None and old.attn_res_window is None
    assert old.to_dict().items() >= {k: v for k, v in OLD_SAVED.items() if k != "betas"}.items()
    # the model it builds is the one today's hand-mapping built
    mc = old.model_config(vocab_size=257)
    assert (mc.max_position_embeddings, mc.block_size, mc.rope_theta, mc.attn_res_two_phase) == (2048, 2, 1e4, True)
    now = load_config("smoke", overrides={"data_dir": "/tmp/attnres-data", "sources": ["shakespeare"]})
    check_resumable(old, now)  # the new keys at their defaults are no change
    with pytest.raises(ConfigError, match="cannot resume with a different config: rope_theta"):
        check_resumable(old, load_config("smoke", overrides={**OLD_SAVED, "rope_theta": 5e5}))


def test_cli_records_model_keys_in_run_json_and_refuses_them_on_resume(tmp_path, tiny_yaml, capsys):
    import json

    from attnres.cli import main

    out = tmp_path / "run"
    path = tiny_yaml(max_steps=2, eval_every=2, checkpoint_every=2)
    bad = ["train", "--config", str(path), "--out", str(out), "--no-progress"]
    # a scheme key of another scheme, an unknown key: one line, exit 1, no run directory
    for extra, match in (
        (["--residual", "standard", "--set", "attn_res_window=3"], "attn_res_window=3 is a key of residual=block/full"),
        (["--set", "rope_thta=5e5"], "unknown config key 'rope_thta'"),
    ):
        assert main(bad + extra) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err and not out.exists()
    args = bad + ["--set", "rope_theta=5e5", "--set", "attn_res_block_layers=1", "--set", "attn_res_window=2"]
    assert main(args) == 0, capsys.readouterr().err
    info = json.loads((out / "run.json").read_text())
    assert (info["config"]["rope_theta"], info["config"]["attn_res_block_layers"]) == (5e5, 1)
    assert info["model_config"]["rope_theta"] == 5e5 and info["model_config"]["attn_res_window"] == 2
    capsys.readouterr()
    rc = main(["train", "--out", str(out), "--resume", "--no-progress", "--max-steps", "3", "--set", "rope_theta=1e4"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "cannot resume with a different config: rope_theta" in err


def test_a_run_dir_written_before_the_model_keys_resumes(tmp_path, trained, capsys):
    """A checkpoint, run.json and train_config.json whose config lacks the derived keys (as today's files)."""
    import json
    import shutil

    import torch

    from attnres.cli import main
    from attnres.train import find_checkpoint
    from attnres.train.checkpoint import STATE_FILE

    out = tmp_path / "old"
    shutil.copytree(trained, out)
    new = set(allowed_keys()) - set(OLD_SAVED)
    assert {"rope_theta", "attn_res_block_layers", "hyper_streams"} <= new
    ckpt = find_checkpoint(out)
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    state["train_config"] = {k: v for k, v in state["train_config"].items() if k not in new}
    torch.save(state, ckpt / STATE_FILE)
    for path in (out / "run.json", ckpt / "train_config.json"):
        if path.is_file():
            d = json.loads(path.read_text())
            cfg = d["config"] if "config" in d else d
            for k in new:
                cfg.pop(k, None)
            path.write_text(json.dumps(d))
    rc = main(["train", "--out", str(out), "--resume", "--max-steps", "5", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    info = json.loads((out / "run.json").read_text())
    assert info["resumes"][-1]["config"]["rope_theta"] == 1e4 and info["resumes"][-1]["step"] == 4
