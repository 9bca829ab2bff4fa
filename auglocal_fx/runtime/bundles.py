"""How a bundle travels: a cut that hands on several tensors hands on a tuple (oldest first), and
every module between cuts takes it as positional arguments. One tensor stays a bare tensor."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bundle", "call", "detach", "Chain", "PickLast"]

Bundle = torch.Tensor | tuple  # a tensor, or a tuple of them


def call(module: nn.Module, h: Bundle):
    """``module(h)``, or ``module(*h)`` for a bundle."""
    return module(*h) if isinstance(h, tuple) else module(h)


def detach(h: Bundle) -> Bundle:
    """``h`` cut from the graph that made it: every tensor of a bundle is detached."""
    if isinstance(h, tuple):
        return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in h)
    return h.detach()


class Chain(nn.Sequential):
    """``nn.Sequential`` whose members may take and return bundles (an aux net of graph pieces)."""

    def forward(self, *xs):
        h = xs if len(xs) > 1 else xs[0]
        for m in self:
            h = call(m, h)
        return h


class PickLast(nn.Module):
    """The newest tensor of a bundle (what a plain network would hand on), for heads that take one."""

    def forward(self, *xs):
        return xs[-1]
