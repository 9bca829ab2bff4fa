"""Recomputing a module's forward during its backward (``torch.utils.checkpoint``) without updating
batch-norm statistics twice.

A block-wise step holds a block's saved activations while its aux net runs forward and backward,
so a unit's peak is block + aux net. Recomputing the block (``recompute="block"``) saves only its
input during the forward pass; its activations exist again only during its own backward, after
the aux net's are freed: the peak falls to the larger of the two, for one more block forward.
Recomputing the aux net instead (``"aux"``) lowers nothing (its activations come back while the
block's are still held); it is offered to measure that.

In training mode a recomputed batch-norm would update its running statistics a second time; they
are restored after the recompute (``frozen_norm_stats``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["RECOMPUTE", "frozen_norm_stats", "run_maybe_recomputed"]

RECOMPUTE = ("none", "block", "aux")


@contextmanager
def frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    """Batch-norm running statistics in ``module`` are as they were before, once the block exits.

    The recompute must run batch-norm exactly as the first pass did (same saved tensors, or the
    checkpoint refuses), so it does update the statistics; they are put back afterwards. Training
    mode normalises with the batch's statistics, so the values put back change nothing computed."""
    state = [(t, t.clone()) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, before in state:
                t.copy_(before)


def run_maybe_recomputed(module: nn.Module, args: tuple, recompute: bool):
    """``module(*args)``; with ``recompute`` (and gradients on), through ``torch.utils.checkpoint``:
    nothing inside is saved for backward but the inputs, and the forward runs again in the backward."""
    if not (recompute and torch.is_grad_enabled()):
        return module(*args)
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), frozen_norm_stats(module)))
