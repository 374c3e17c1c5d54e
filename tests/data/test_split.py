"""Train/val split by document: deterministic per seed, disjoint, never empty."""

import pytest

from attnres.data import prepare_data, split_documents

IDS = [f"doc{i:03d}" for i in range(60)]


def test_same_seed_gives_the_same_split():
    assert split_documents(IDS, 0.2, seed=3) == split_documents(list(IDS), 0.2, seed=3)


def test_different_seeds_give_different_splits():
    assert split_documents(IDS, 0.2, seed=0)[1] != split_documents(IDS, 0.2, seed=1)[1]


def test_split_is_a_partition_that_keeps_document_order():
    train, val = split_documents(IDS, 0.2, seed=0)
    assert not set(train) & set(val)
    assert sorted(train + val) == IDS
    assert train == [i for i in IDS if i in set(train)] and val == [i for i in IDS if i in set(val)]


def test_val_share_follows_val_fraction():
    _, val = split_documents([f"d{i}" for i in range(2000)], 0.1, seed=0)
    assert 150 < len(val) < 250


def test_split_does_not_depend_on_the_other_documents():
    """A document's side is a function of its id and the seed only (adding a document moves no other)."""
    _, val = split_documents(IDS, 0.2, seed=0)
    _, val_more = split_documents([*IDS, "extra"], 0.2, seed=0)
    assert set(val) == set(val_more) - {"extra"}


@pytest.mark.parametrize("fraction", [1e-9, 0.999999])
def test_at_least_one_document_on_each_side(fraction):
    for ids in (["a", "b"], IDS):
        train, val = split_documents(ids, fraction, seed=0)
        assert len(train) >= 1 and len(val) >= 1


def test_prepared_split_matches_split_documents_and_is_disjoint(corpus_dir, tmp_path):
    data = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="byte", val_fraction=0.25,
                        split_seed=7, progress=False)
    splits = data.manifest["splits"]
    all_ids = [f"corpus/doc{i:02d}.txt" for i in range(20)]
    assert (splits["train"]["docs"], splits["val"]["docs"]) == split_documents(all_ids, 0.25, seed=7)
    assert not set(splits["train"]["docs"]) & set(splits["val"]["docs"])
    other = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="byte", val_fraction=0.25,
                         split_seed=8, progress=False)
    assert other.dir != data.dir
    assert other.manifest["splits"]["val"]["docs"] != splits["val"]["docs"]


def test_document_ids_do_not_depend_on_where_the_corpus_lives(tmp_path):
    from .helpers import write_corpus

    a = prepare_data(tmp_path / "c1", [str(write_corpus(tmp_path / "x" / "corpus"))], tokenizer="byte",
                     progress=False)
    b = prepare_data(tmp_path / "c2", [str(write_corpus(tmp_path / "y" / "corpus"))], tokenizer="byte",
                     progress=False)
    assert a.manifest["splits"] == b.manifest["splits"]
