"""PEFT LoRA on an AttnResForCausalLM: LoRA on the attention projections, the AttnRes read parameters trained
alongside through ``modules_to_save``, a few steps on real text (Shakespeare, byte tokens), then
merge_and_unload and the adapter's save / load held to the adapter model's own logits."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from attnres import AttnResConfig, AttnResForCausalLM
from attnres.data import byte_tokenizer, encode_text

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'attnres[peft]')")

TEXT = Path(__file__).parents[1] / "convert" / "data" / "heldout.txt"  # The Winter's Tale, 6 KB
READS = ("attn_res", "mlp_res", "output_res")  # every read point's module: pseudo_query, key_norm_weight
SEQ = 128


def tiny(residual: str) -> AttnResForCausalLM:
    torch.manual_seed(0)
    config = AttnResConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, residual=residual, attn_res_num_blocks=2, max_position_embeddings=256,
    )
    return AttnResForCausalLM(config)


def lora_config():
    return peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], modules_to_save=list(READS),
        task_type="CAUSAL_LM",
    )


def windows() -> torch.Tensor:
    ids = torch.from_numpy(encode_text(byte_tokenizer(), TEXT.read_text()).astype("int64"))
    n = len(ids) // SEQ
    return ids[: n * SEQ].view(n, SEQ)


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


# peft reads transformers' deprecated is_gradient_checkpointing (transformers' own FutureWarning, not ours)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("residual", ["block", "full"])
def test_lora_with_attnres_reads_trains_merges_and_round_trips(residual, tmp_path):
    base = tiny(residual)
    base.save_pretrained(tmp_path / "base")
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    x = windows()
    train, held = x[:-2], x[-2:]
    assert len(train) >= 8, len(train)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.get_peft_model(base, lora_config())
    ours = [str(w.message) for w in caught if "attnres" in str(w.filename) or "attnres" in str(w.message).lower()]
    assert not ours, ours

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    reads = trainable - lora
    assert lora and all((".q_proj." in n or ".v_proj." in n) for n in lora), sorted(lora)
    # the trainable copy of every read point: 2 reads per layer + the final aggregation, 2 parameters each
    assert len(reads) == 2 * (2 * base.config.num_hidden_layers + 1), sorted(reads)
    assert all(".modules_to_save.default." in n and n.endswith(("pseudo_query", "key_norm_weight")) for n in reads)

    # weight_decay=0: a parameter moves only if its gradient is nonzero
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    held_before = model(input_ids=held, labels=held).loss.item()
    model.train()
    losses = []
    for step in range(12):
        batch = train[(4 * step) % (len(train) - 3):][:4]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    held_after = model(input_ids=held, labels=held).loss.item()
    assert held_after < held_before - 0.05, (held_before, held_after, losses)
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.15, losses

    after = dict(model.named_parameters())
    changed = {n for n, p in before.items() if not torch.equal(after[n].detach(), p)}
    assert changed <= trainable, sorted(changed - trainable)
    # every LoRA matrix and every read's parameters moved, except layer 0's pre-attention read: it has one
    # source (the embedding), a constant softmax, so no gradient (its key-norm gain and query stay put)
    unread = {n for n in reads if ".layers.0.attn_res." in n}
    assert changed == trainable - unread, sorted((trainable - unread) ^ changed)
    # the base model's own weights (the read points' originals included) are unchanged
    for name, p in base.named_parameters():
        if ".modules_to_save." in name or ".lora_" in name:
            continue
        key = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        assert torch.equal(p.detach(), frozen[key]), name

    probe = held  # 2 x 128 tokens: the two-phase path
    short = held[:, :32]  # < 64 tokens without grad: the decode path (bank) rather than the two-phase one
    expect_long, expect_short = logits(model, probe), logits(model, short)
    gen_kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=256)
    expect_gen = model.generate(input_ids=short[:1], **gen_kw)

    # save / load of the adapter: LoRA matrices and the read copies, onto a fresh base from disk
    model.save_pretrained(tmp_path / "adapter")
    saved = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    assert any("attn_res" in k and k.endswith("pseudo_query") for k in saved), sorted(saved)
    assert any("output_res" in k for k in saved), sorted(saved)
    fresh = AttnResForCausalLM.from_pretrained(tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded, probe), expect_long, rtol=0, atol=0)
    torch.testing.assert_close(logits(loaded, short), expect_short, rtol=0, atol=0)

    # merge_and_unload: a plain AttnResForCausalLM (LoRA folded into q/v, the trained reads in place)
    merged = model.merge_and_unload()
    assert type(merged) is AttnResForCausalLM
    assert not any(".lora_" in n or "modules_to_save" in n or "original_module" in n
                   for n, _ in merged.named_parameters())
    assert merged.model.layers[1].attn_res.pseudo_query.abs().sum() > 0
    torch.testing.assert_close(logits(merged, probe), expect_long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(merged, short), expect_short, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.generate(input_ids=short[:1], **gen_kw), expect_gen)
    # and it saves / loads as an ordinary checkpoint
    merged.save_pretrained(tmp_path / "merged")
    again = AttnResForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(again, probe), expect_long, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_reads_trained_by_name_are_not_in_the_adapter(tmp_path):
    """The alternative to modules_to_save, ``requires_grad_(True)`` on the read parameters by name, trains
    them in place but PEFT's adapter file holds only the LoRA weights: why the README says modules_to_save."""
    base = tiny("block")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    by_name = [p for n, p in model.named_parameters() if any(f".{r}." in n for r in READS)]
    assert len(by_name) == 2 * (2 * base.config.num_hidden_layers + 1)
    for p in by_name:
        p.requires_grad_(True)
    model.save_pretrained(tmp_path / "adapter")
    saved = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    assert saved and all(".lora_" in k for k in saved), sorted(saved)
