"""lm-evaluation-harness on a tiny trained checkpoint, offline: a local ``loglikelihood_rolling`` task over a
local text file (one document per line), its word / byte perplexity and bits per byte held to the same
quantities summed directly from the model's log-probabilities (an oracle outside lm-eval's plumbing:
tokenisation, prefix token, windows, word / byte counts, aggregation)."""

from __future__ import annotations

import json
import math
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

from attnres.evaluate_lm import INSTALL_HINT, LmEvalError, run_lm_eval

TEXT = Path(__file__).parents[1] / "convert" / "data" / "heldout.txt"  # The Winter's Tale, 6 KB


@pytest.fixture
def harness(monkeypatch):
    """lm-eval importable, and no network: the hub offline, and any socket connection an error."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'attnres[eval]')")
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'attnres[eval]')")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError(f"network access in an offline test: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def write_task(root: Path, lines: list[str], name: str = "local_ppl") -> Path:
    """A task directory: ``name``.yaml (``dataset_path: text``, one document per line) and its data file."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "docs.txt"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: text\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}, "
        f"cache_dir: {json.dumps(str(root / 'hf'))}}}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n"
        "  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n"
    )
    return root


def documents(max_bytes: int, n: int = 12, min_bytes: int = 1) -> list[str]:
    """Lines of the held-out play of ``min_bytes`` to ``max_bytes`` UTF-8 bytes (one token each here)."""
    lines = [line.strip() for line in TEXT.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if min_bytes <= len(line.encode("utf-8")) <= max_bytes]
    assert len(lines) >= n, len(lines)
    return lines[:n]


def oracle(checkpoint: Path, docs: list[str], window: int) -> dict[str, float]:
    """lm-eval's three metrics from our own forward. A document's tokens are predicted in consecutive chunks
    of ``window`` (the last one shorter); a chunk ending at token e is scored from one forward over the
    ``window`` tokens before e (the EOS prefix in front of the document's tokens, so the first chunk sees the
    prefix and a full chunk after it only the last token of the chunk before, while the shorter last chunk
    sees a whole window of history); log-likelihood = sum of the log-softmax at the true next tokens."""
    from attnres.train.checkpoint import load_pretrained

    model, tok, _ = load_pretrained(checkpoint)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ll, words, nbytes = 0.0, 0, 0
    for doc in docs:
        ids = tok.encode(doc, add_special_tokens=False)
        full = [prefix, *ids]  # ids[i] is full[i + 1]
        done = 0
        while done < len(ids):
            n = min(window, len(ids) - done)
            end = done + n
            x = torch.tensor([full[max(0, end - window):end]])
            with torch.no_grad():
                logp = model(x, use_cache=False).logits[0, -n:].float().log_softmax(-1)
            ll += logp[torch.arange(n), torch.tensor(ids[done:end])].double().sum().item()
            done = end
        words += len(re.split(r"\s+", doc))
        nbytes += len(doc.encode("utf-8"))
    return {
        "word_perplexity": math.exp(-ll / words),
        "byte_perplexity": math.exp(-ll / nbytes),
        "bits_per_byte": -ll / nbytes / math.log(2),
    }


def metrics(result: dict, task: str = "local_ppl") -> dict[str, float]:
    return {k.split(",")[0]: v for k, v in result["results"][task].items() if not k.split(",")[0].endswith("_stderr")}


def test_one_window_per_document_equals_our_own_log_likelihood(harness, trained, tmp_path):
    """Every document (<= 100 bytes = tokens) fits one window of 128: lm-eval's score is exactly the
    model's log-likelihood of the document after the prefix token, nothing cut or re-conditioned."""
    ckpt = trained / "checkpoint"
    docs = documents(max_bytes=100)
    task = write_task(tmp_path / "tasks", docs)
    result = run_lm_eval(ckpt, "local_ppl", include_path=task, max_length=128, batch_size=4, device="cpu")
    assert result["n_samples"] == {"local_ppl": len(docs)}
    assert result["max_length"] == 128 and result["prefix_token_id"] == 256  # the byte tokenizer's <|endoftext|>
    got, want = metrics(result), oracle(ckpt, docs, window=128)
    assert set(want) <= set(got), got
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5), (name, got[name], value)
    # 4 training steps: already better than uniform over the 257 tokens
    assert got["bits_per_byte"] < math.log2(257), got


def test_rolling_windows_default_to_the_training_seq_len(harness, trained, tmp_path):
    """Without --seq-len the window is the run's training seq_len (32): documents of 65 to 100 tokens take 3 or
    4 windows (lm-eval's rolling windows: see oracle)."""
    ckpt = trained / "checkpoint"
    docs = documents(max_bytes=100, n=6, min_bytes=65)  # 3 or 4 windows each
    task = write_task(tmp_path / "tasks", docs, name="local_rolling")
    result = run_lm_eval(ckpt, ["local_rolling"], include_path=task, batch_size=3, device="cpu", limit=5)
    assert result["max_length"] == 32
    assert result["n_samples"] == {"local_rolling": 5}
    got, want = metrics(result, "local_rolling"), oracle(ckpt, docs[:5], window=32)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5), (name, got[name], value)


def test_cli_eval_lm_eval_prints_json(harness, trained, tmp_path, capsys):
    from attnres.cli import main

    docs = documents(max_bytes=100, n=4)
    task = write_task(tmp_path / "tasks", docs)
    code = main(["eval", "--checkpoint", str(trained), "--lm-eval", "local_ppl", "--lm-eval-include", str(task),
                 "--seq-len", "128", "--limit", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n_samples"] == {"local_ppl": 3} and out["max_length"] == 128
    want = oracle(trained / "checkpoint", docs[:3], window=128)
    assert metrics(out)["word_perplexity"] == pytest.approx(want["word_perplexity"], rel=1e-5)
    # and as a table
    assert main(["eval", "--checkpoint", str(trained), "--lm-eval", "local_ppl", "--lm-eval-include", str(task),
                 "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "local_ppl  word_perplexity" in text and "windows of 32 tokens" in text, text


def test_bad_input_is_one_line(harness, trained, tmp_path, capsys):
    from attnres.cli import main

    with pytest.raises(LmEvalError, match="unknown lm-eval task 'no_such_task'"):
        run_lm_eval(trained, "no_such_task", include_path=write_task(tmp_path / "t", ["a b"]))
    with pytest.raises(LmEvalError, match="not a directory"):
        run_lm_eval(trained, "local_ppl", include_path=tmp_path / "missing")
    with pytest.raises(LmEvalError, match="at least one task"):
        run_lm_eval(trained, " , ")
    no_dir = str(tmp_path / "no")
    assert main(["eval", "--checkpoint", str(trained), "--lm-eval", "x", "--lm-eval-include", no_dir]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"attnres: error: --lm-eval-include is not a directory: {tmp_path / 'no'}"], err
    assert main(["eval", "--checkpoint", str(trained), "--text", str(TEXT), "--limit", "3"]) == 1
    assert capsys.readouterr().err.strip() == "attnres: error: --limit goes with --lm-eval"


def test_without_lm_eval_the_error_names_the_extra(monkeypatch, trained):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ModuleNotFoundError
    with pytest.raises(LmEvalError, match=re.escape(INSTALL_HINT)):
        run_lm_eval(trained, "local_ppl")
