"""Named running sums of an epoch, kept on the device and synchronised in bulk.

A training step adds tensors and never calls ``.item()``: on a GPU that would make the host wait
for every step to finish before it queues the next. The sums are named views into one flat
float64 tensor, so bringing them to the host, or summing them over the processes, is one copy or
one ``all_reduce`` whatever their number.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Sums"]


class Sums:
    """Sums named in ``sizes`` (name -> number of entries), zero at the start, on ``device``.

    Example:
        >>> s = Sums({"loss": 3, "images": 1}, torch.device("cpu"))
        >>> s.add("loss", torch.tensor([1.0, 2.0]), at=slice(0, 2))
        >>> s.add("images", 8)
        >>> s.reduce()["loss"]
        [1.0, 2.0, 0.0]
    """

    def __init__(self, sizes: dict[str, int], device: torch.device):
        self._slices, at = {}, 0
        for name, n in sizes.items():
            self._slices[name] = slice(at, at + n)
            at += n
        self._flat = torch.zeros(at, dtype=torch.float64, device=device)

    def add(self, name: str, value, at=None) -> None:
        """``value`` (a number or a tensor on the device) added to ``name``, or to its entries ``at``."""
        view = self._flat[self._slices[name]]
        if at is None:
            view += value
        else:
            view[at] += value

    def reduce(self, group=None) -> dict[str, list[float]]:
        """Every sum, summed over the processes of ``group`` (the default group when it is None, none
        outside torchrun), as lists of floats on the host: one ``all_reduce`` and one copy."""
        flat = self._flat
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            flat = flat.clone()
            dist.all_reduce(flat, group=group)
        values = flat.tolist()
        return {name: values[s] for name, s in self._slices.items()}
