import pytest

from .helpers import write_corpus


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs PyPI (skipped when it is unreachable)")


@pytest.fixture(autouse=True)
def _private_data_cache(tmp_path, monkeypatch):
    """No data test may write to the real user cache (~/.cache/attnres): the default points into tmp_path."""
    monkeypatch.setenv("ATTNRES_DATA", str(tmp_path / "attnres-cache"))


@pytest.fixture
def corpus_dir(tmp_path):
    """A directory of 20 small .txt documents."""
    return write_corpus(tmp_path / "corpus")
