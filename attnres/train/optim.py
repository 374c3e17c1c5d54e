"""Optimizers, parameter groups and learning-rate schedules.

Parameter groups (PAPER §10): the AttnRes parameters (each read point's ``pseudo_query`` and
``key_norm_weight``) and every 1-D parameter (RMSNorm gains) get no weight decay and stay fp32.
With ``optimizer="muon"``, ``torch.optim.Muon`` updates the 2-D hidden weights (attention and MLP
projections) and AdamW everything else (embeddings, LM head, gains, AttnRes parameters); Muon uses
``adjust_lr_fn="match_rms_adamw"`` so the same ``lr`` and ``weight_decay`` work for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .config import TrainConfig

ATTNRES_PARAMS = ("pseudo_query", "key_norm_weight")  # DepthQuery's parameter names
READ_POINTS = ("attn_res", "mlp_res", "output_res")  # where every scheme's read/write parameters live


def is_residual_param(name: str) -> bool:
    """A residual scheme's parameter (a DepthQuery, DenseFormer's DWA weights, HC's matrices, ...)."""
    return any(part in READ_POINTS for part in name.split(".")[:-1])


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Residual-scheme parameters and 1-D parameters (norm gains, biases) are not weight-decayed: decay
    would pull a scheme's identity-initialised weights toward 0, not toward its init."""
    return param.ndim < 2 or is_residual_param(name)


def is_muon_param(name: str, param: torch.Tensor) -> bool:
    """2-D hidden weights: not the embedding, not the LM head, not residual-scheme parameters."""
    return (
        param.ndim == 2
        and not is_no_decay(name, param)
        and "embed_tokens" not in name
        and "lm_head" not in name
    )


def param_groups(model: nn.Module, cfg: TrainConfig) -> dict[str, list[dict]]:
    """``{"adamw": [groups], "muon": [groups]}``; each group has a ``name`` and ``weight_decay``."""
    decay, no_decay, muon = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and is_muon_param(name, p):
            muon.append(p)
        elif is_no_decay(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    adamw = [
        dict(params=decay, weight_decay=cfg.weight_decay, name="decay"),
        dict(params=no_decay, weight_decay=0.0, name="no_decay"),
    ]
    groups = {"adamw": [g for g in adamw if g["params"]]}
    if muon:
        groups["muon"] = [dict(params=muon, weight_decay=cfg.weight_decay, name="muon")]
    return groups


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    groups = param_groups(model, cfg)
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups["adamw"], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    ]
    if "muon" in groups:
        if not hasattr(torch.optim, "Muon"):
            raise ValueError(
                f"optimizer='muon' needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}"
            )
        opts.append(
            torch.optim.Muon(
                groups["muon"], lr=cfg.lr, momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw"
            )
        )
    return opts


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """The multiplier of ``cfg.lr`` for optimizer step ``k`` (0-based), as ``LambdaLR`` expects.

    - warmup (both): linear from ``1/warmup_steps`` to 1 over the first ``warmup_steps`` steps;
    - ``cosine``: then half a cosine from 1 down to ``min_lr_ratio`` at the last step;
    - ``wsd`` (warmup-stable-decay): then 1 until the last ``decay_fraction * max_steps`` steps,
      which decay linearly to ``min_lr_ratio`` at the last step.
    """
    warmup, total, floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio
    decay_steps = max(1, round(cfg.decay_fraction * total))
    decay_start = max(warmup, total - decay_steps)

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        if cfg.schedule == "cosine":
            span = max(1, total - 1 - warmup)
            p = min(1.0, (k - warmup) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        if k < decay_start:
            return 1.0
        p = min(1.0, (k - decay_start + 1) / max(1, total - decay_start))
        return 1.0 - (1.0 - floor) * p

    return factor


def build_schedulers(
    opts: list[torch.optim.Optimizer], cfg: TrainConfig
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    return [torch.optim.lr_scheduler.LambdaLR(o, lr_factor(cfg)) for o in opts]
