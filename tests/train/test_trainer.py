"""The parts of the training loop: one step over micro-batches, its host reads, the wrap seam."""


import pytest
import torch
from torch import nn

from attnres import AttnResForCausalLM
from attnres.train import NonFiniteLoss, read_metrics, train
from attnres.train.optim import build_optimizers, build_schedulers
from attnres.train.trainer import StepOutput, TrainState, forward_backward, optimizer_step

from .helpers import Float64Loss, losses

VOCAB = 257


def _state(cfg, dtype=torch.float32) -> TrainState:
    torch.manual_seed(cfg.seed)
    model = AttnResForCausalLM(cfg.model_config(vocab_size=VOCAB)).to(dtype).train()
    with torch.no_grad():  # no zero-initialised parameter: every gradient path is exercised
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    opts = build_optimizers(model, cfg)
    wrapped = Float64Loss(model) if dtype == torch.float64 else model
    return TrainState(model, wrapped, opts, build_schedulers(opts, cfg))


@pytest.mark.parametrize("residual", ["standard", "block", "full"])
def test_grad_accum_micro_batches_give_the_loss_and_gradients_of_one_big_batch(tiny_cfg, residual):
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    big_cfg = tiny_cfg(residual=residual, grad_clip=0.0, grad_accum=1, batch_size=8, seq_len=16)
    big = _state(big_cfg, torch.float64)
    big_out = forward_backward(big, [ids], big_cfg)
    micro_cfg = tiny_cfg(residual=residual, grad_clip=0.0, grad_accum=4, batch_size=2, seq_len=16)
    micro = _state(micro_cfg, torch.float64)
    micro_out = forward_backward(micro, ids.split(2), micro_cfg)
    assert micro_out.micro_losses.shape == (4,)
    torch.testing.assert_close(micro_out.micro_losses.mean(), big_out.micro_losses[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(micro_out.grad_norm, big_out.grad_norm, rtol=1e-12, atol=0)
    for (name, p), q in zip(micro.model.named_parameters(), big.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=name)
    loss, grad_norm = micro_out.read()
    assert loss == pytest.approx(big_out.micro_losses.item(), rel=1e-12)
    assert grad_norm == micro_out.grad_norm.item()


def test_read_is_one_host_copy_and_sums_the_micro_losses_in_float64():
    out = StepOutput(torch.tensor([1.0, 2.0, 4.0]), torch.tensor(3.5))
    assert out.read() == (1.0 / 3 + 2.0 / 3 + 4.0 / 3, 3.5)  # float64 sum of loss_i / n, as before


class _HostReads:
    """Counts the ways a tensor's value reaches Python (each a device sync off the CPU)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, fn):
        def wrapper(*args, **kwargs):
            self.n += 1
            return fn(*args, **kwargs)

        return wrapper


def test_forward_backward_reads_nothing_to_the_host_and_read_reads_once(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(residual="block", grad_accum=4, batch_size=2)
    state = _state(cfg)
    ids = torch.randint(0, VOCAB, (8, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    reads = _HostReads(monkeypatch)
    out = forward_backward(state, ids.split(2), cfg)
    assert reads.n == 0
    out.read()
    assert reads.n == 1


def test_host_reads_of_a_run_do_not_grow_with_grad_accum(tmp_path, tiny_cfg, monkeypatch):
    reads = _HostReads(monkeypatch)
    counts = {}
    for grad_accum in (1, 3):
        cfg = tiny_cfg(grad_accum=grad_accum, max_steps=3, eval_every=3, checkpoint_every=3, eval_batches=1)
        before = reads.n
        train(cfg, tmp_path / f"ga{grad_accum}", progress=False)
        counts[grad_accum] = reads.n - before
    assert counts[1] == counts[3] > 0


class _Wrapper(nn.Module):
    """A stand-in for DDP: runs the model and counts the forwards it saw."""

    def __init__(self, model):
        super().__init__()
        self.module = model
        self.forwards = 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return self.module(*args, **kwargs)


def _norm_gain(model: nn.Module) -> tuple[nn.Module, nn.Parameter]:
    return next((m, m.weight) for m in model.modules() if getattr(m, "weight", None) is not None and m.weight.ndim == 1)


def test_wrap_comes_before_the_optimizers_and_every_step_runs_through_it(tmp_path, tiny_cfg):
    seen = {}

    def wrap(model):
        # like fully_shard, replace a parameter: the optimizers must be built on the new one
        module, gain = _norm_gain(model)
        module.weight = nn.Parameter(gain.detach().clone())
        seen.update(wrapper=_Wrapper(model), gain=module.weight, before=module.weight.detach().clone())
        return seen["wrapper"]

    cfg = tiny_cfg(grad_accum=2, max_steps=4)
    train(cfg, tmp_path / "wrapped", progress=False, wrap=wrap)
    train(cfg, tmp_path / "plain", progress=False)
    assert isinstance(seen["wrapper"].module, AttnResForCausalLM)
    assert seen["wrapper"].forwards == cfg.max_steps * cfg.grad_accum  # evaluation uses the model itself
    assert not torch.equal(seen["gain"].detach(), seen["before"])  # the optimizer stepped the new parameter
    assert losses(tmp_path / "wrapped") == losses(tmp_path / "plain")


def test_a_nonfinite_step_is_never_applied(tmp_path, tiny_cfg):
    class NanAtStep3(_Wrapper):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if self.forwards > 2 * 2:  # the first micro-batch of step 3
                out.loss = out.loss * float("nan")
            return out

    wrapped = []
    cfg = tiny_cfg(grad_accum=2, max_steps=6, checkpoint_every=2, eval_every=2)
    with pytest.raises(NonFiniteLoss, match="non-finite training loss .* at step 3.*step 2"):
        train(cfg, tmp_path / "run", progress=False, wrap=lambda m: wrapped.append(NanAtStep3(m)) or wrapped[-1])
    assert all(torch.isfinite(p).all() for p in wrapped[0].module.parameters())
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train_loss" in r] == [1, 2]


def test_optimizer_step_counts_steps_and_tokens_and_returns_the_lr_it_used(tiny_cfg):
    cfg = tiny_cfg(grad_accum=2, warmup_steps=4)
    state = _state(cfg)
    ids = torch.randint(0, VOCAB, (2 * cfg.batch_size, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    lrs = []
    for _ in range(2):
        forward_backward(state, ids.split(cfg.batch_size), cfg)
        lrs.append(optimizer_step(state, cfg))
    assert (state.step, state.tokens) == (2, 2 * cfg.tokens_per_step)
    assert lrs == pytest.approx([cfg.lr / 4, cfg.lr * 2 / 4])


def test_forward_backward_refuses_the_wrong_number_of_micro_batches(tiny_cfg):
    cfg = tiny_cfg(grad_accum=2)
    state = _state(cfg)
    with pytest.raises(ValueError, match="grad_accum=2 micro-batches; got 1"):
        forward_backward(state, [torch.zeros(1, 8, dtype=torch.long)], cfg)
