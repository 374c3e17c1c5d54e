"""prepare_data: sources, uint16 token files equal to the encoding, manifest, cache reuse and repair."""

import json

import numpy as np
import pytest

import attnres.data.tokenizer as tokmod
from attnres.data import encode_text, load_tokenizer, prepare_data, strip_gutenberg

from .helpers import doc_text


def expected_tokens(data, split, texts_by_id):
    eos = data.tokenizer.eos_token_id
    parts = []
    for doc_id in data.manifest["splits"][split]["docs"]:
        parts += [encode_text(data.tokenizer, texts_by_id[doc_id]), np.array([eos], dtype=np.uint16)]
    return np.concatenate(parts)


UNICODE_DOC = "Ünïcödé 日本語 🙂👍🏽 and a literal <|endoftext|> inside.\n"


def corpus_texts(n=20):
    return {**{f"corpus/doc{i:02d}.txt": doc_text(i) for i in range(n)}, "corpus/doc20.txt": UNICODE_DOC}


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_token_files_are_uint16_memmaps_equal_to_the_encoding(corpus_dir, tmp_path, kind):
    (corpus_dir / "doc20.txt").write_text(UNICODE_DOC, encoding="utf-8")
    data = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer=kind, vocab_size=300,
                        val_fraction=0.2, progress=False)
    texts = corpus_texts()
    for split, arr in (("train", data.train), ("val", data.val)):
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
        np.testing.assert_array_equal(np.asarray(arr), expected_tokens(data, split, texts))
        assert data.manifest["splits"][split]["tokens"] == len(arr)
    assert data.train_bytes == sum(len(texts[d].encode()) for d in data.manifest["splits"]["train"]["docs"])
    assert data.val_bytes == sum(len(texts[d].encode()) for d in data.manifest["splits"]["val"]["docs"])
    assert data.vocab_size == len(data.tokenizer) == data.manifest["tokenizer"]["vocab_size"]
    if kind == "byte":
        n_train_docs = data.manifest["splits"]["train"]["num_docs"]
        assert data.vocab_size == 257 and len(data.train) == data.train_bytes + n_train_docs
    else:
        assert data.vocab_size <= 300


def test_txt_jsonl_and_directory_sources_combine(tmp_path):
    (tmp_path / "one.txt").write_text("A single text file.\n")
    rows = [{"text": "first json doc"}, {"text": ""}, {"text": "third ünïcode doc", "id": 3}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    sub = tmp_path / "dir"
    (sub / "nested").mkdir(parents=True)
    (sub / "a.txt").write_text("dir doc a")
    (sub / "nested" / "b.jsonl").write_text(json.dumps({"text": "dir jsonl b"}) + "\n")
    (sub / "ignored.csv").write_text("x,y")
    srcs = [str(tmp_path / "one.txt"), str(tmp_path / "rows.jsonl"), str(sub)]
    data = prepare_data(tmp_path / "cache", srcs, tokenizer="byte", progress=False)
    ids = data.manifest["splits"]["train"]["docs"] + data.manifest["splits"]["val"]["docs"]
    expected = ["one.txt", "rows.jsonl#1", "rows.jsonl#3", "dir/a.txt", "dir/nested/b.jsonl#1"]
    assert sorted(ids) == sorted(expected)
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]).tolist())
    for piece in ["A single text file.\n", "first json doc", "third ünïcode doc", "dir doc a", "dir jsonl b"]:
        assert piece in text
    assert [s["num_docs"] for s in data.manifest["sources"]] == [1, 2, 2]


def test_second_call_reuses_the_cache_without_retraining(corpus_dir, tmp_path, monkeypatch):
    calls = []
    real = tokmod.train_bpe_tokenizer
    monkeypatch.setattr(tokmod, "train_bpe_tokenizer", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = prepare_data(tmp_path / "cache", [str(corpus_dir)], vocab_size=300, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in first.dir.rglob("*") if p.is_file()}
    second = prepare_data(tmp_path / "cache", [str(corpus_dir)], vocab_size=300, progress=False)
    assert len(calls) == 1
    assert second.dir == first.dir
    assert {p: p.stat().st_mtime_ns for p in second.dir.rglob("*") if p.is_file()} == stamps
    np.testing.assert_array_equal(second.train, first.train)


def test_corrupt_token_file_is_rebuilt_without_retraining(corpus_dir, tmp_path, monkeypatch):
    calls = []
    real = tokmod.train_bpe_tokenizer
    monkeypatch.setattr(tokmod, "train_bpe_tokenizer", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = prepare_data(tmp_path / "cache", [str(corpus_dir)], vocab_size=300, progress=False)
    good = np.array(first.train)
    raw = bytearray((first.dir / "train.bin").read_bytes())
    raw[10] ^= 0xFF
    (first.dir / "train.bin").write_bytes(bytes(raw))
    again = prepare_data(tmp_path / "cache", [str(corpus_dir)], vocab_size=300, progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(again.train, good)


def test_corrupt_tokenizer_file_retrains(corpus_dir, tmp_path, monkeypatch):
    calls = []
    real = tokmod.train_bpe_tokenizer
    monkeypatch.setattr(tokmod, "train_bpe_tokenizer", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = prepare_data(tmp_path / "cache", [str(corpus_dir)], vocab_size=300, progress=False)
    with open(first.dir / "tokenizer" / "tokenizer.json", "a") as f:
        f.write(" ")
    again = prepare_data(tmp_path / "cache", [str(corpus_dir)], vocab_size=300, progress=False)
    assert len(calls) == 2
    np.testing.assert_array_equal(again.train, first.train)


def test_unreadable_manifest_rebuilds(corpus_dir, tmp_path):
    first = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="byte", progress=False)
    (first.dir / "manifest.json").write_text("{ not json")
    again = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="byte", progress=False)
    assert again.manifest["files"] == first.manifest["files"]
    assert json.loads((first.dir / "manifest.json").read_text())["files"] == first.manifest["files"]


def test_manifest_checksums_match_the_files_and_no_temp_files_remain(corpus_dir, tmp_path):
    import hashlib

    data = prepare_data(tmp_path / "cache", [str(corpus_dir)], vocab_size=300, progress=False)
    files = data.manifest["files"]
    assert {"train.bin", "val.bin", "tokenizer/tokenizer.json"} <= set(files)
    for rel, digest in files.items():
        assert hashlib.sha256((data.dir / rel).read_bytes()).hexdigest() == digest
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name or ".saving-" in p.name]
    assert leftovers == []
    assert load_tokenizer(data.dir / "tokenizer").get_vocab() == data.tokenizer.get_vocab()


def test_changed_source_text_gets_a_new_cache_entry(corpus_dir, tmp_path):
    first = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="byte", progress=False)
    (corpus_dir / "doc03.txt").write_text("changed text")
    second = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="byte", progress=False)
    assert second.dir != first.dir
    assert "changed text" in second.tokenizer.decode(np.concatenate([second.train, second.val]).tolist())


def test_progress_lines_are_printed_when_asked(corpus_dir, tmp_path, capsys):
    prepare_data(tmp_path / "cache", [str(corpus_dir)], vocab_size=300, progress=True)
    err = capsys.readouterr().err
    assert "training byte-level BPE" in err and "encoding train" in err
    prepare_data(tmp_path / "cache2", [str(corpus_dir)], vocab_size=300, progress=False)
    assert capsys.readouterr().err == ""


def test_gutenberg_boilerplate_is_stripped_where_markers_exist():
    body = "ACT I.\n\nEnter a Ghost.\n"
    text = ("The Project Gutenberg EBook of Hamlet\r\nlicense blah\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n" + body.replace("\n", "\r\n")
            + "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore license\r\n")
    assert strip_gutenberg(text) == body.strip()
    old_style = "header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n" + body + \
        "End of the Project Gutenberg Etext of Hamlet\n"
    assert strip_gutenberg(old_style) == body.strip()
    assert strip_gutenberg("\n" + body) == body.strip()  # no markers: the text is kept
