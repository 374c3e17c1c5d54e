import pytest

from .helpers import write_corpus


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs PyPI (skipped when it is unreachable)")


@pytest.fixture
def corpus_dir(tmp_path):
    """A directory of 20 small .txt documents."""
    return write_corpus(tmp_path / "corpus")
