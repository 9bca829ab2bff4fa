"""Train / eval mode for the length of a block of code: tracing, profiling and export need a mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["set_mode", "eval_mode"]


@contextmanager
def set_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put ``model`` in train (``True``) or eval mode; its own mode comes back afterwards, even on error."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


def eval_mode(model: nn.Module):
    """``set_mode(model, False)``: no batch-norm statistic updates, no dropout."""
    return set_mode(model, False)
