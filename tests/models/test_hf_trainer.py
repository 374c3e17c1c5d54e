"""HF ``transformers.Trainer`` trains an AttnResForCausalLM (activation checkpointing on), without warnings
from our model."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from attnres import AttnResConfig, AttnResForCausalLM

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

VOCAB = 64


class RandomIds(torch.utils.data.Dataset):
    def __init__(self, n: int = 12, seq_len: int = 16):
        self.ids = torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# transformers 5.24 renames TrainingArguments.gradient_checkpointing to activation_checkpointing (its own warning)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_hf_trainer_trains_a_block_model_with_gradient_checkpointing(tmp_path):
    torch.manual_seed(0)
    config = AttnResConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, residual="block", attn_res_num_blocks=2, max_position_embeddings=64,
    )
    model = AttnResForCausalLM(config)
    with torch.no_grad():  # the pseudo-queries start at zero; any nonzero gradient moves them
        before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("pseudo_query")}
    assert before
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        gradient_checkpointing=True,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomIds())
        result = trainer.train()
    ours = [w for w in caught if "attnres" in str(w.filename) or "attnres" in str(w.message).lower()]
    assert not ours, [str(w.message) for w in ours]
    assert math.isfinite(result.training_loss)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any(layer.gradient_checkpointing for layer in model.model.layers)
    after = dict(model.named_parameters())
    changed = {name for name, p in before.items() if not torch.equal(after[name].detach(), p)}
    # a read over a single source (the first sublayer's: the embedding only) has a constant softmax, so its
    # query gets no gradient; every other pseudo-query moved
    assert set(before) - changed == {"model.layers.0.attn_res.pseudo_query"}, sorted(set(before) - changed)
