"""Shared fixtures: a small local corpus (no network), a prepared byte-level data dir, tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attnres.train import TrainConfig, load_config

from .helpers import TINY, write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_cfg(corpus, data_dir):
    def make(**kw) -> TrainConfig:
        return load_config(
            "smoke", overrides={**TINY, "sources": [str(corpus)], "data_dir": str(data_dir), **kw}
        )

    return make


@pytest.fixture
def tiny_yaml(tmp_path, corpus, data_dir):
    """Write the tiny config as a YAML file for the CLI (--config)."""

    def make(**kw) -> Path:
        path = tmp_path / f"tiny-{len(list(tmp_path.glob('tiny-*.yaml')))}.yaml"
        values = {**TINY, "sources": [str(corpus)], "data_dir": str(data_dir), **kw}
        path.write_text(yaml.safe_dump({"preset": "smoke", **values}))
        return path

    return make


@pytest.fixture(scope="session")
def trained(tmp_path_factory, corpus, data_dir) -> Path:
    """A run directory with a finished tiny run (checkpoint + metrics)."""
    from attnres.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_config(
        "smoke",
        overrides={
            **TINY,
            "sources": [str(corpus)],
            "data_dir": str(data_dir),
            "max_steps": 4,
            "eval_every": 4,
        },
    )
    train(cfg, out, progress=False)
    return out
