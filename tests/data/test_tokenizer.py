"""Tokenizers: byte-level exact round trip, BPE round trip, save/load, trained on the train split only."""

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from attnres.data import (
    EOS_TOKEN,
    byte_tokenizer,
    encode_text,
    load_tokenizer,
    prepare_data,
    train_bpe_tokenizer,
)

from .helpers import doc_text, write_corpus

TRICKY = [
    "",
    "plain ascii, with  double  spaces and\ttabs\nand newlines\r\n",
    "  leading and trailing spaces  ",
    "Ünïcödé:日本語, emoji 🙂👍🏽, combining é, RTL שלום, zero-width\u200bjoin",
    f"a literal {EOS_TOKEN} inside a document",
    "\x00\x01 control bytes \x7f",
]


@pytest.mark.parametrize("text", TRICKY)
def test_byte_tokenizer_round_trips_exactly(text):
    tok = byte_tokenizer()
    ids = encode_text(tok, text)
    assert tok.decode(ids.tolist()) == text


@pytest.mark.parametrize("text", TRICKY)
def test_byte_token_ids_are_the_utf8_bytes(text):
    ids = encode_text(byte_tokenizer(), text)
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(text.encode("utf-8"))


def test_byte_tokenizer_is_a_fast_hf_tokenizer_with_eos_256():
    tok = byte_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 257 and tok.eos_token == EOS_TOKEN and tok.eos_token_id == 256


def test_encode_text_adds_nothing_and_keeps_special_strings_as_text():
    tok = train_bpe_tokenizer([doc_text(i) for i in range(5)], vocab_size=300)
    ids = encode_text(tok, f"king {EOS_TOKEN} queen")
    assert tok.eos_token_id not in ids.tolist()
    assert tok.decode(ids.tolist()) == f"king {EOS_TOKEN} queen"


def test_bpe_round_trips_ascii_text():
    tok = train_bpe_tokenizer([doc_text(i) for i in range(10)], vocab_size=400)
    for text in [doc_text(99), "Hello , world !  It's  a test ; isn't it ?\n\n", " x ", "CAPS and 12345"]:
        ids = encode_text(tok, text)
        assert tok.decode(ids.tolist()) == text
    assert len(encode_text(tok, doc_text(99))) < len(doc_text(99).encode()) / 2  # merges were learned


def test_saved_tokenizer_loads_back_identically(tmp_path):
    tok = train_bpe_tokenizer([doc_text(i) for i in range(10)], vocab_size=350)
    tok.save_pretrained(tmp_path / "tok")
    for loaded in (load_tokenizer(tmp_path / "tok"), load_tokenizer(tmp_path / "tok" / "tokenizer.json"),
                   AutoTokenizer.from_pretrained(tmp_path / "tok")):
        assert loaded.eos_token == EOS_TOKEN and loaded.eos_token_id == tok.eos_token_id
        assert len(loaded) == len(tok)
        assert encode_text(loaded, doc_text(5)).tolist() == encode_text(tok, doc_text(5)).tolist()


def test_bpe_is_trained_on_the_train_split_only(tmp_path):
    """A word repeated only in val documents is not merged; the same kind of word in train documents is."""
    corpus = write_corpus(tmp_path / "corpus")
    first = prepare_data(tmp_path / "cache", [str(corpus)], tokenizer="byte", val_fraction=0.3,
                         progress=False)
    val_names = {d.split("/")[-1] for d in first.manifest["splits"]["val"]["docs"]}
    assert val_names and len(val_names) < 20

    def text(i):
        word = " zqxjvkwp" if f"doc{i:02d}.txt" in val_names else " flumbrix"
        return doc_text(i) + word * 200 + "\n"

    write_corpus(corpus, text=text)
    data = prepare_data(tmp_path / "cache", [str(corpus)], tokenizer="bpe", vocab_size=320, val_fraction=0.3,
                        progress=False)
    assert data.manifest["splits"]["val"]["docs"] == first.manifest["splits"]["val"]["docs"]
    assert len(encode_text(data.tokenizer, " flumbrix")) == 1
    assert len(encode_text(data.tokenizer, " zqxjvkwp")) >= 5
    trained_on = data.manifest["tokenizer"]["trained_on"]
    assert trained_on["split"] == "train"
    assert trained_on["docs_sha256"] == data.manifest["splits"]["train"]["docs_sha256"]
    assert trained_on["num_docs"] == data.manifest["splits"]["train"]["num_docs"]
