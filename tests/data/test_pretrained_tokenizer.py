"""prepare_data(tokenizer="pretrained", tokenizer_path=DIR): a model's own tokenizer encodes the corpus.

Its eos token separates documents, the cache is keyed by the sha256 of its tokenizer.json (two tokenizers
never share token files), and a tokenizer without eos or with ids past uint16 is a one-line error.
"""

import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from attnres.data import encode_text, prepare_data
from attnres.data.tokenizer import MAX_VOCAB_SIZE

from .helpers import doc_text

EOS = "<|im_end|>"  # SmolLM2-135M-Instruct's eos; not the byte / BPE tokenizers' <|endoftext|>


def own_tokenizer(directory, vocab_size: int = 320, eos: str | None = EOS, seed: int = 0):
    """A small byte-level BPE with its own special tokens (``<|im_start|>`` first, so the eos id is not 0),
    saved with save_pretrained like an upcycled model's; ``seed`` picks the training text (another seed:
    another tokenizer)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|im_start|>", EOS, "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([doc_text(i + 100 * seed) for i in range(10)], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, clean_up_tokenization_spaces=False)
    tok.save_pretrained(directory)
    return tok


def test_the_corpus_is_encoded_with_the_tokenizer_and_its_eos(corpus_dir, tmp_path):
    (corpus_dir / "doc20.txt").write_text(f"a literal {EOS} inside a document\n")
    tok = own_tokenizer(tmp_path / "model")
    data = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="pretrained",
                        tokenizer_path=tmp_path / "model", val_fraction=0.2, progress=False)
    eos = tok.convert_tokens_to_ids(EOS)
    assert eos == 1 and data.eos_token_id == eos and data.tokenizer.eos_token == EOS
    assert data.tokenizer.get_vocab() == tok.get_vocab() and data.vocab_size == len(tok)
    texts = {f"corpus/doc{i:02d}.txt": doc_text(i) for i in range(20)}
    texts["corpus/doc20.txt"] = f"a literal {EOS} inside a document\n"
    for split, arr in (("train", data.train), ("val", data.val)):
        assert arr.dtype == np.uint16
        want = np.concatenate([np.append(encode_text(tok, texts[d]), np.uint16(eos))
                               for d in data.manifest["splits"][split]["docs"]])
        np.testing.assert_array_equal(np.asarray(arr), want)
        assert int((np.asarray(arr) == eos).sum()) == data.manifest["splits"][split]["num_docs"]  # text stays text
    rec = data.manifest["tokenizer"]
    assert rec["kind"] == "pretrained" and rec["source"] == str((tmp_path / "model").absolute())
    assert rec["eos_token"] == EOS and rec["trained_on"] is None
    assert data.manifest["config"]["tokenizer_sha256"] == rec["tokenizer_sha256"]
    assert re.fullmatch(r"corpus-pretrained320-[0-9a-f]{12}", data.dir.name)


def test_the_cache_is_keyed_by_the_tokenizer_itself(corpus_dir, tmp_path, monkeypatch):
    kw = dict(val_fraction=0.2, progress=False)
    own_tokenizer(tmp_path / "a")
    own_tokenizer(tmp_path / "b", seed=1)  # same size, other merges
    own_tokenizer(tmp_path / "c", eos="<|endoftext|>")  # same vocabulary, another eos
    a = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="pretrained", tokenizer_path=tmp_path / "a", **kw)
    b = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="pretrained", tokenizer_path=tmp_path / "b", **kw)
    c = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="pretrained", tokenizer_path=tmp_path / "c", **kw)
    assert len({a.dir, b.dir, c.dir}) == 3 and a.vocab_size == b.vocab_size == c.vocab_size
    assert not np.array_equal(np.asarray(a.train), np.asarray(b.train))
    assert c.eos_token_id == c.tokenizer.convert_tokens_to_ids("<|endoftext|>") != a.eos_token_id
    # the same tokenizer elsewhere is the same entry (content, not path), reused without re-encoding
    own_tokenizer(tmp_path / "a-copy")
    import attnres.data.prepare as prep

    monkeypatch.setattr(prep, "_build", lambda *a, **k: pytest.fail("re-encoded a cached corpus"))
    again = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="pretrained",
                         tokenizer_path=tmp_path / "a-copy", **kw)
    assert again.dir == a.dir
    monkeypatch.undo()
    # an edited tokenizer.json at the same path is another tokenizer: another entry
    tj = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    x, y = sorted(vocab, key=vocab.get)[200:202]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    (tmp_path / "a" / "tokenizer.json").write_text(json.dumps(tj))
    edited = prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="pretrained",
                          tokenizer_path=tmp_path / "a", **kw)
    assert edited.dir not in (a.dir, b.dir, c.dir)


def test_errors(corpus_dir, tmp_path):
    src = [str(corpus_dir)]
    with pytest.raises(ValueError, match="tokenizer='pretrained' needs tokenizer_path"):
        prepare_data(tmp_path / "cache", src, tokenizer="pretrained", progress=False)
    own_tokenizer(tmp_path / "t")
    with pytest.raises(ValueError, match="tokenizer_path is for 'pretrained' only"):
        prepare_data(tmp_path / "cache", src, tokenizer="bpe", tokenizer_path=tmp_path / "t", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        prepare_data(tmp_path / "cache", src, tokenizer="pretrained", tokenizer_path=tmp_path / "empty", progress=False)
    own_tokenizer(tmp_path / "no-eos", eos=None)
    with pytest.raises(ValueError, match="has no eos token"):
        prepare_data(tmp_path / "cache", src, tokenizer="pretrained", tokenizer_path=tmp_path / "no-eos",
                     progress=False)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load the tokenizer in") as e:
        prepare_data(tmp_path / "cache", src, tokenizer="pretrained", tokenizer_path=tmp_path / "corrupt",
                     progress=False)
    assert "\n" not in str(e.value)


def test_a_vocabulary_past_uint16_is_refused(corpus_dir, tmp_path):
    vocab = {f"w{i}": i for i in range(MAX_VOCAB_SIZE)} | {"[UNK]": MAX_VOCAB_SIZE, EOS: MAX_VOCAB_SIZE + 1}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS).save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match=r"has 65,538 tokens; token files are uint16, so at most 65,536 fit") as e:
        prepare_data(tmp_path / "cache", [str(corpus_dir)], tokenizer="pretrained", tokenizer_path=tmp_path / "big",
                     progress=False)
    assert "\n" not in str(e.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.name.startswith("corpus-") for p in cache.iterdir())  # nothing written
