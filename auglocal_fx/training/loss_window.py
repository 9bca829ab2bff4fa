"""The steps since the host last looked at their losses (``log_interval``): a Trainer's epoch adds
each step's losses here, on the device, and looks at them once per interval, for the progress line
and the finite-loss check, with one copy to the host."""

from __future__ import annotations

import torch

from .metrics import Sums
from .report import EpochProgress
from .techniques import hard_labels

__all__ = ["LossWindow"]


class LossWindow:
    """The steps since the host last looked: their losses stay on the device until ``close``, which
    adds them to the epoch's sums, checks them, and updates the progress bar, with one copy to the
    host (and, with data-parallel replicas, one all_reduce over them, so that every replica stops
    at the same step when a loss is not finite)."""

    def __init__(self, strategy, device: torch.device, check_finite, sums: Sums, epoch: int, bar: EpochProgress):
        # check_finite(value, unit, epoch, step): the Trainer's, which names where a loss first broke
        self.strategy, self.device, self.check_finite = strategy, device, check_finite
        self.sums, self.epoch, self.bar = sums, epoch, bar
        self.rows, self.sizes, self.finite_inputs = [], [], []
        self.seen = [0.0, 0.0, 0.0]  # the epoch so far, over the replicas: final loss sum, correct, images

    def add(self, step: int, out, y: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Step ``step``'s losses (``out``), labels ``y`` and input batch ``x`` (floating point: checked
        for NaN / inf on the device, so a loss that breaks on bad data blames the data)."""
        finite = torch.isfinite(x).all() if x is not None and x.is_floating_point() else torch.ones((), dtype=torch.bool)
        self.finite_inputs.append(finite.to(self.device))
        losses = torch.cat([out.local_losses, out.loss.reshape(1)])  # of this process's units, in order
        has_head = self.strategy.has_head
        correct = (out.logits.argmax(1) == hard_labels(y)).sum() if has_head else losses.new_zeros(())
        self.rows.append(torch.cat([losses * len(y), correct.reshape(1).to(losses.dtype)]))
        self.sizes.append(len(y))
        self.bar.update(step)

    def close(self, step: int) -> None:
        s, device = self.strategy, self.device
        first = step - len(self.rows) + 1
        rows = torch.stack(self.rows).double()  # steps x (losses of this process's units..., correct)
        sizes = torch.tensor(self.sizes, dtype=torch.float64, device=device)
        self.sums.add("loss", rows[:, :-1].sum(0), at=slice(s.mine[0], s.mine[-1] + 1))
        if s.has_head:
            self.sums.add("correct", rows[:, -1].sum())
            self.sums.add("images", sizes.sum())
            self.sums.add("step_loss", rows[:, -2], at=slice(first - 1, step))
            self.sums.add("step_images", sizes, at=slice(first - 1, step))
        look = Sums({"rows": rows.numel(), "sizes": len(self.sizes), "bad_inputs": len(self.sizes)}, device)
        look.add("rows", rows.flatten())
        look.add("sizes", sizes)
        look.add("bad_inputs", (~torch.stack(self.finite_inputs)).double())
        seen = look.reduce(s.dp_group)
        width = rows.shape[1]
        for k in range(len(self.sizes)):
            row = seen["rows"][k * width:(k + 1) * width]
            for i, value in zip(s.mine, row[:-1]):
                self.check_finite(value / seen["sizes"][k], i, self.epoch, first + k, seen["bad_inputs"][k] > 0)
            self.seen = [self.seen[0] + row[-2], self.seen[1] + row[-1], self.seen[2] + seen["sizes"][k]]
        self.rows, self.sizes, self.finite_inputs = [], [], []
        if s.has_head:
            images = self.seen[2]
            self.bar.update(step, self.seen[0] / images, self.seen[1] / images, images)
