"""Measured cost of each local unit, for splitting pipeline stages by time (``parallel.balance: time``).

FLOPs predict a CPU's time poorly across a network: a block on a 28x28 map with 16 channels does
few FLOPs per byte it touches, a block on 7x7 with 64 channels many. So before training, one
process times every unit's forward, local loss and backward on a random batch of the run's size
(on a deep copy of one unit at a time: the run's weights, batch-norm statistics and random stream
are left as they were, and the copy costs one unit's memory, not the net's), and the stages are
split on those seconds.
"""

from __future__ import annotations

import copy
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..runtime.bundles import call, detach

__all__ = ["unit_seconds"]


def unit_seconds(units: list, input_size: list[int], classes: int, batch: int, device: torch.device,
                 repeats: int = 3, autocast_dtype: torch.dtype | None = None,
                 input_dtype: torch.dtype = torch.float32, copy_unit=None) -> list[float]:
    """Median seconds of each unit's forward + local loss + backward, after one warm-up step
    (forwards under autocast to ``autocast_dtype`` when the run uses it) on inputs of ``input_dtype``
    (integer ids: zeros), each unit timed on a copy of it (``copy_unit(i)``, default a deep copy;
    ``AugLocalNet.unit_copy`` builds an aux net left on the meta device) on ``device``, on the
    output of the one before."""
    gen = torch.Generator().manual_seed(0)  # a private stream: the run's random draws are untouched
    if input_dtype.is_floating_point:
        x = torch.randn(batch, *input_size, generator=gen).to(device, input_dtype)
    else:  # token ids: 0 is an entry of every embedding table
        x = torch.zeros(batch, *input_size, dtype=input_dtype, device=device)
    y = torch.randint(0, max(classes, 1), (batch,), generator=gen).to(device)
    seconds, h = [], x
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws leave no trace
        for i, unit in enumerate(units):
            copied = (copy_unit(i) if copy_unit is not None else copy.deepcopy(unit)).to(device).train()
            times, h = _time_unit(copied, h, x, y, device, repeats, autocast_dtype)
            seconds.append(statistics.median(times))
            del copied
    return seconds


def _time_unit(unit, h, x, y, device: torch.device, repeats: int, autocast_dtype: torch.dtype | None):
    """``(seconds of each timed step, the unit's detached output)``; the first step warms up the
    allocator and kernels."""
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext())
    times = []
    for rep in range(repeats + 1):
        start = time.perf_counter()
        with amp:
            out, top = call(unit, h)
            loss, _ = unit.local_loss(top, y, x, F.cross_entropy)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if rep:
            times.append(time.perf_counter() - start)
        unit.zero_grad(set_to_none=True)
    return times, detach(out)
