"""Optimizer and per-step learning-rate schedule from a recipe (torch.optim and its lr_scheduler)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from .config import OptimizerSection, ScheduleSection

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(params, cfg: OptimizerSection) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum by default, as the paper) or AdamW; weight decay on every parameter."""
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: ScheduleSection, epochs: int,
                    steps_per_epoch: int) -> LRScheduler:
    """Stepped once per optimizer step: linear warmup over ``warmup_epochs``, then cosine to ``min_lr``
    at the last step (or a constant lr)."""
    total = max(epochs * steps_per_epoch, 1)
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.name == "cosine":
        main = CosineAnnealingLR(opt, T_max=total - warmup, eta_min=cfg.min_lr)
    else:
        main = ConstantLR(opt, factor=1.0, total_iters=0)
    if warmup <= 0:
        return main
    ramp = LinearLR(opt, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=warmup)
    return SequentialLR(opt, [ramp, main], milestones=[warmup])
