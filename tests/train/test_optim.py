"""Parameter groups (no decay, fp32 for AttnRes and 1-D params), Muon split, schedule shapes."""

import math

import pytest
import torch

from attnres import AttnResForCausalLM
from attnres.train import build_optimizers, load_config, lr_factor, param_groups
from attnres.train.optim import build_schedulers, is_no_decay

from .helpers import TINY


def tiny_model(residual="block", **kw):
    cfg = load_config("smoke", overrides={**TINY, "residual": residual, **kw})
    return cfg, AttnResForCausalLM(cfg.model_config(vocab_size=257))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("residual", ["block", "full", "standard"])
def test_attnres_and_1d_params_get_no_weight_decay_and_stay_fp32(optimizer, residual):
    cfg, model = tiny_model(residual, optimizer=optimizer, weight_decay=0.1)
    groups = [g for gs in param_groups(model, cfg).values() for g in gs]
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names), "every parameter in exactly one group"
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            if name.endswith(("pseudo_query", "key_norm_weight")) or p.ndim < 2:
                assert g["weight_decay"] == 0.0, name
                assert p.dtype == torch.float32, name
            else:
                assert g["weight_decay"] == 0.1, name
    attnres = [n for n in names.values() if n.endswith(("pseudo_query", "key_norm_weight"))]
    assert (residual == "standard") == (not attnres)
    assert all(is_no_decay(n, model.get_parameter(n)) for n in attnres)


def test_muon_takes_only_2d_hidden_weights_and_both_optimizers_step():
    cfg, model = tiny_model("block", optimizer="muon")
    groups = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in groups["muon"] for p in g["params"]]
    assert muon and all(("proj" in n) and "residual" not in n for n in muon)
    assert not any(k in n for n in muon for k in ("embed_tokens", "lm_head", "norm"))
    opts = build_optimizers(model, cfg)
    assert [type(o).__name__ for o in opts] == ["AdamW", "Muon"]
    ids = torch.randint(0, 257, (2, 16))
    model(ids, labels=ids).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for o in opts:
        o.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert set(muon) <= changed and "model.embed_tokens.weight" in changed


def _curve(**kw):
    cfg = load_config("smoke", overrides={"max_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw})
    f = lr_factor(cfg)
    return [f(k) for k in range(cfg.max_steps)]


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_floor():
    c = _curve(schedule="cosine")
    assert c[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert c[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(c[10:], c[11:], strict=False))
    assert c[-1] == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert lr_factor(load_config("smoke", overrides={"max_steps": 100, "warmup_steps": 10}))(
        int(mid)
    ) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))


def test_wsd_schedule_is_flat_then_decays_linearly_over_the_last_fraction():
    c = _curve(schedule="wsd", decay_fraction=0.2)
    assert c[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert c[10:80] == pytest.approx([1.0] * 70)
    tail = c[80:]
    steps = [a - b for a, b in zip(tail, tail[1:], strict=False)]
    assert all(s == pytest.approx(steps[0]) for s in steps) and steps[0] > 0  # linear
    assert c[-1] == pytest.approx(0.1)


def test_scheduler_sets_the_optimizer_lr_each_step():
    cfg, model = tiny_model(max_steps=20, warmup_steps=4, lr=2e-3)
    opts = build_optimizers(model, cfg)
    scheds = build_schedulers(opts, cfg)
    f = lr_factor(cfg)
    for k in range(cfg.max_steps):
        assert all(g["lr"] == pytest.approx(2e-3 * f(k)) for g in opts[0].param_groups)
        opts[0].step()
        scheds[0].step()


@pytest.mark.parametrize("residual", ["hc", "depth_mha", "denseformer"])
def test_every_residual_scheme_parameter_is_neither_decayed_nor_muon(residual):
    cfg, standard = tiny_model("standard", optimizer="muon", weight_decay=0.1)
    model = AttnResForCausalLM(type(standard.config)(**{**standard.config.to_dict(), "residual": residual}))
    groups = param_groups(model, cfg)
    decayed = {id(p) for g in groups["adamw"] if g["weight_decay"] > 0 for p in g["params"]}
    muon = {id(p) for g in groups["muon"] for p in g["params"]}
    scheme = [(n, p) for n, p in model.named_parameters() if any(r in n for r in ("_res.", "output_res."))]
    assert scheme and (residual == "denseformer" or any(p.ndim == 2 for _, p in scheme))  # 2-D matrices too
    for n, p in scheme:
        assert id(p) not in decayed and id(p) not in muon, n
