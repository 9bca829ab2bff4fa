"""Optimizer and per-step learning-rate schedule from a recipe (torch.optim and its lr_scheduler).

``OPTIMIZERS`` and ``SCHEDULES`` are the registries the recipe keys ``optimizer.name`` and
``schedule.name`` choose from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from ..runtime.unit_optim import UnitOptimizers, fused_kwargs

if TYPE_CHECKING:  # config's choices come from the registries here, so config imports this module
    from .config import OptimizerSection, ScheduleSection

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler"]


def _sgd(params: list, cfg: OptimizerSection, **impl) -> torch.optim.Optimizer:
    """SGD, Nesterov momentum by default (as the paper)."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0, **impl)


def _adamw(params: list, cfg: OptimizerSection, **impl) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **impl)


# (params, cfg, **implementation keywords such as fused=True) -> optimizer
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": _sgd, "adamw": _adamw}
_CLASSES = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}  # which implementations each has

# main schedule after the warmup: (optimizer, steps, cfg) -> scheduler
SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, int, ScheduleSection], LRScheduler]] = {
    "cosine": lambda opt, steps, cfg: CosineAnnealingLR(opt, T_max=steps, eta_min=cfg.min_lr),
    "constant": lambda opt, steps, cfg: ConstantLR(opt, factor=1.0, total_iters=0),
}


def build_optimizer(units: list, order: list, cfg: OptimizerSection, device: torch.device) -> UnitOptimizers:
    """The recipe's optimizer, one per unit over its own parameters (``UnitOptimizers``; the fused
    implementation on CUDA), indexed in checkpoints by ``order``; weight decay on every parameter."""
    impl = fused_kwargs(_CLASSES.get(cfg.name, object), device)
    return UnitOptimizers(units, lambda params: OPTIMIZERS[cfg.name](params, cfg, **impl), order=order)


def build_scheduler(opt: torch.optim.Optimizer, cfg: ScheduleSection, epochs: int,
                    steps_per_epoch: int) -> LRScheduler:
    """Stepped once per optimizer step: linear warmup over ``warmup_epochs``, then the named
    schedule until the last step (cosine ends at ``min_lr``)."""
    total = max(epochs * steps_per_epoch, 1)
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    main = SCHEDULES[cfg.name](opt, total - warmup, cfg)
    if warmup <= 0:
        return main
    ramp = LinearLR(opt, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=warmup)
    return SequentialLR(opt, [ramp, main], milestones=[warmup])
