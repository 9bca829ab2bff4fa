"""The training techniques timm's train script users reach for, as recipe keys switch them on.

- ``mixup``: ``timm.data.Mixup`` (mixup, cutmix), applied where a batch is loaded (one process, or
  a pipeline's first stage: the mixed images and soft targets then travel to the later stages);
  ``label_smoothing`` is folded into the mixed targets then, else given to the loss.
- ``label_smoothing``: ``F.cross_entropy(label_smoothing=)``, for the final loss and every local loss.
- ``ema_decay``: ``timm.utils.ModelEmaV3`` per local unit, updated after every step; evaluation and
  ``best.pt`` use the averaged weights. A pipeline stage averages its own units.
- ``clip_grad``: each unit's gradients clipped by norm right after its backward (``blockwise_step``).
- ``channels_last``: the net's weights and 4-d inputs in channels-last memory format.
- ``threads``: ``torch.set_num_threads``.
- ``host_memory``: ``keep`` raises glibc's trim and mmap thresholds (``runtime/host_memory.py``).
- ``tensorboard``: ``torch.utils.tensorboard`` events beside ``metrics.jsonl`` and the plot.

Every local loss takes the targets the final loss takes: with mixup an aux head learns the mixed
labels as the final head does (AugLocal's aux nets are classifiers like the head).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import AugLocalError

__all__ = ["Mixing", "UnitEma", "check_techniques", "loss_function", "hard_labels", "tensorboard_writer"]


def check_techniques(recipe, batch_per_process: int, env=None) -> None:
    """One-line refusals before anything is built (``env``: the run's processes and device)."""
    offload = recipe.offload != "none"
    if recipe.cuda_graphs and offload:
        raise AugLocalError("recipe keys cuda_graphs and offload: a graph replays fixed addresses and offloading moves "
                            "the aux nets every step; choose one (offload for memory, cuda_graphs for speed)")
    if offload and recipe.ema_decay:
        raise AugLocalError("recipe key offload keeps the aux nets in host memory and ema_decay averages them on the "
                            "device; drop one of them")
    if recipe.cuda_graphs and recipe.overlap:
        raise AugLocalError("recipe keys cuda_graphs and overlap: a unit's graph holds its whole step, so its parts "
                            "cannot run beside the next unit's; choose one")
    for key, on, off_value in (("cuda_graphs", recipe.cuda_graphs, "false"), ("offload", offload, "none"),
                               ("overlap", recipe.overlap, "false")):
        if not on:
            continue
        if key != "overlap" and not recipe.optimizer.per_unit:
            raise AugLocalError(f"recipe key {key} works on each unit's optimizer update as it happens; set "
                                f"optimizer.per_unit: true, or {key}: {off_value}")
        if env is not None and env.device.type != "cuda":
            raise AugLocalError(f"recipe key {key} needs a CUDA device and this run is on {env.device.type}; set "
                                f"device: cuda on a machine with a GPU, or {key}: {off_value}")
        if env is not None and env.world > 1:
            raise AugLocalError(f"recipe key {key} works on the units of one process and this run has {env.world} "
                                f"(torchrun); train in one process, or set {key}: {off_value}")
    m = recipe.mixup
    if (m.mixup_alpha or m.cutmix_alpha) and batch_per_process % 2:
        raise AugLocalError(f"recipe key mixup needs an even batch per process (it blends each sample with the "
                            f"batch flipped), got {batch_per_process}; make batch_size even per process")
    if recipe.tensorboard:
        try:
            import tensorboard  # noqa: F401  torch.utils.tensorboard needs it
        except ImportError:
            raise AugLocalError("recipe key tensorboard needs the tensorboard package: pip install tensorboard "
                                "(or 'auglocal-fx[tensorboard]'), or set tensorboard: false") from None


class Mixing:
    """What a loaded batch goes through before the first unit: device, memory format, mixup."""

    def __init__(self, recipe, classes: int, device: torch.device):
        self.device, self.channels_last = device, recipe.channels_last
        m = recipe.mixup
        self.mixup = None
        if m.mixup_alpha or m.cutmix_alpha:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                               switch_prob=m.switch_prob, mode=m.mode, label_smoothing=recipe.label_smoothing,
                               num_classes=classes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if train and self.mixup is not None:
            x, y = self.mixup(x, y)  # y: (N, classes) soft targets
        return x, y


def loss_function(recipe):
    """The loss of every unit: cross-entropy, smoothed unless mixup already smoothed the targets."""
    m = recipe.mixup
    if recipe.label_smoothing and not (m.mixup_alpha or m.cutmix_alpha):
        return functools.partial(F.cross_entropy, label_smoothing=recipe.label_smoothing)
    return F.cross_entropy  # takes soft (N, classes) targets as they are


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices to count accuracy against: a mixed target's larger label."""
    return y.argmax(-1) if y.is_floating_point() else y


class UnitEma:
    """An exponential moving average of each unit's weights and buffers (``timm.utils.ModelEmaV3``)."""

    def __init__(self, units: list, decay: float):
        from timm.utils import ModelEmaV3

        self.emas = [ModelEmaV3(getattr(u, "module", u), decay=decay) for u in units]

    @torch.no_grad()
    def update(self, units: list) -> None:
        for ema, u in zip(self.emas, units):
            ema.update(getattr(u, "module", u))

    @property
    def units(self) -> list:
        return [ema.module for ema in self.emas]

    def state_dicts(self) -> list[dict]:
        return [ema.module.state_dict() for ema in self.emas]

    def load(self, states: list[dict]) -> None:
        for ema, state in zip(self.emas, states):
            ema.module.load_state_dict(state)


def tensorboard_writer(out: Path):
    """A ``SummaryWriter`` on ``<out>/tensorboard`` (the recipe switched it on and this is process 0)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))


def write_scalars(writer, record: dict, step: int) -> None:
    """Every number of an epoch's record (lists as one curve per entry: aux heads, stages)."""
    for key, value in record.items():
        if key in ("epoch", "step_losses"):
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            writer.add_scalar(key, value, step)
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            for i, v in enumerate(value):
                writer.add_scalar(f"{key}/{i}", v, step)
    writer.flush()
