"""``attnres convert``: a saved checkpoint through every layout and back; one-line errors, nothing written."""

import json
import subprocess
import sys

import pytest
import torch

import attnres_cli
from attnres import AttnResForCausalLM
from attnres.convert import LAYOUTS, MISSING_FINAL

from ..test_cli import run
from ._tiny import logits, random_model, tiny_config

IDS = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(3))


def one_line_error(rc, err, match: str) -> None:
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnres: error: ") and match in lines[0], err


def nothing_written(parent, name) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]  # no temporary left behind


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = random_model(tiny_config("block-aligned"))
    src = tmp_path_factory.mktemp("src") / "ours"
    model.save_pretrained(src)
    return src, model


def test_parser_names_match_the_package():
    assert attnres_cli.LAYOUTS == tuple(LAYOUTS)
    assert attnres_cli.MISSING_FINAL == MISSING_FINAL


def test_help_lists_layouts_without_importing_torch():
    code = ("import sys, attnres_cli\ntry:\n    attnres_cli.main(['convert', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    out = " ".join(out.split())
    assert "--from LAYOUT" in out and "attnres, k3, fla, torchtitan, megatron, gguf" in out
    assert out.strip().endswith("no torch")


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "attnres"])
def test_there_and_back(saved, tmp_path, capsys, layout):
    src, model = saved
    out, back = tmp_path / layout, tmp_path / "back"
    rc, stdout, err = run(["convert", src, "--from", "attnres", "--to", layout, "--out", out], capsys)
    assert rc == 0, err
    assert stdout.startswith(f"attnres -> {layout}: ") and "block size 4 sublayers, final aggregation yes" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    titan = {"enabled": True, "num_blocks": 2, "layers_per_block": 2, "norm_eps": 1e-5}
    units = {"k3": ("attn_res_block_size", 2), "fla": ("attnres_block_size", 4),
             "megatron": ("attn_res_block_layers", 4), "gguf": ("llama.attn_res_block_size", 2),
             "torchtitan": ("attn_res", titan)}
    key, value = units[layout]
    assert json.loads((out / "config.json").read_text())[key] == value
    rc, _, err = run(["convert", out, "--from", layout, "--to", "attnres", "--out", back], capsys)
    assert rc == 0, err
    loaded = AttnResForCausalLM.from_pretrained(back).eval()
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_a_map_that_does_not_match_writes_nothing(saved, tmp_path, capsys):
    src, _ = saved
    rc, _, err = run(["convert", src, "--from", "fla", "--to", "k3", "--out", tmp_path / "out"], capsys)
    one_line_error(rc, err, "layout fla: the config lacks num_heads")
    fla = tmp_path / "fla"
    assert run(["convert", src, "--from", "attnres", "--to", "fla", "--out", fla], capsys)[0] == 0
    (fla / "config.json").write_text(json.dumps({**json.loads((fla / "config.json").read_text()), "num_kv_heads": 4}))
    rc, _, err = run(["convert", fla, "--from", "fla", "--to", "k3", "--out", tmp_path / "out"], capsys)
    one_line_error(rc, err, "layout fla: model.layers.0.attn.k_proj.weight has shape [16, 32], the map needs [32, 32]")
    nothing_written(tmp_path, "out")


def test_unexpressible_block_size_writes_nothing(tmp_path, capsys):
    src = tmp_path / "full"
    random_model(tiny_config("full")).save_pretrained(src)
    rc, _, err = run(["convert", src, "--from", "attnres", "--to", "k3", "--out", tmp_path / "out"], capsys)
    one_line_error(rc, err, "layout k3 counts attn_res_block_size in decoder layers; this model has residual='full'")
    nothing_written(tmp_path, "out")


def test_bad_inputs_are_one_line(saved, tmp_path, capsys):
    src, _ = saved
    cases = {
        "is not a directory": [tmp_path / "nowhere"],
        "has no config.json": [tmp_path],
    }
    for match, argv in cases.items():
        rc, _, err = run(["convert", *argv, "--from", "attnres", "--to", "fla", "--out", tmp_path / "out"], capsys)
        one_line_error(rc, err, match)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    rc, _, err = run(["convert", broken, "--from", "attnres", "--to", "fla", "--out", tmp_path / "out"], capsys)
    one_line_error(rc, err, "model.safetensors: not a readable safetensors file")
    rc, _, err = run(["convert", src, "--from", "attnres", "--to", "fla", "--out", src], capsys)
    one_line_error(rc, err, "is the source directory")
    rc, _, err = run(["convert", src, "--from", "hf", "--to", "fla", "--out", tmp_path / "out"], capsys)
    assert rc == 2 and "invalid choice: 'hf'" in err
    nothing_written(tmp_path, "out")


def test_existing_out_needs_overwrite(saved, tmp_path, capsys):
    src, _ = saved
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run(["convert", src, "--from", "attnres", "--to", "gguf", "--out", out], capsys)
    one_line_error(rc, err, "exists; give --overwrite to replace it")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    rc, _, err = run(["convert", src, "--from", "attnres", "--to", "gguf", "--out", out, "--overwrite"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_leaves_nothing(saved, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    rc, _, err = run(["convert", saved[0], "--from", "attnres", "--to", "fla", "--out", tmp_path / "out"], capsys)
    one_line_error(rc, err, "No space left on device")
    nothing_written(tmp_path, "out")


def test_missing_final_flag(tmp_path, capsys):
    src = tmp_path / "nofinal"
    random_model(tiny_config("block-aligned", final=False)).save_pretrained(src)
    fla = tmp_path / "fla"
    assert run(["convert", src, "--from", "attnres", "--to", "fla", "--out", fla], capsys)[0] == 0
    rc, stdout, _ = run(["convert", fla, "--from", "fla", "--to", "attnres", "--out", tmp_path / "sum"], capsys)
    assert rc == 0 and "final aggregation no" in stdout
    rc, stdout, _ = run(["convert", fla, "--from", "fla", "--to", "attnres", "--out", tmp_path / "init",
                         "--final", "init"], capsys)
    assert rc == 0 and "final aggregation yes" in stdout
    model = AttnResForCausalLM.from_pretrained(tmp_path / "init")
    assert torch.equal(model.model.output_res.pseudo_query, torch.zeros(32))
