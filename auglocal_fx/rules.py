"""Pass 4b — synthesize: build each block's auxiliary network. One registry, one entry per rule.

- ``auglocal``: copies of the plan's selected downstream layers (shape adapters where a copy would
  see the wrong shape), then a copy of the model's own head — the AugLocal method.
- ``dgl``: a small head independent of later layers (DGL, Belilovsky et al. 2020): two 1x1 convs
  (a token MLP for (T, D) activations), pooling, a 2-layer MLP classifier.
- ``bp``: a single block and no aux net: plain end-to-end backprop through the same code path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .adapters import make_adapter
from .errors import AugLocalError
from .plan import AuxRecipe, Plan

__all__ = ["RULES", "register_rule", "AuxContext", "reset_parameters"]


@dataclass
class AuxContext:
    """What a rule may use to build block ``recipe.block``'s aux net."""

    plan: Plan
    recipe: AuxRecipe
    layers: list[nn.Module]  # per-layer templates (graph pieces sharing the backbone's weights)
    head: nn.Module  # the model's head as a graph piece
    num_classes: int
    norm2d: Callable[[int], nn.Module] = nn.BatchNorm2d  # the model's kind of 2-d norm (norm2d_like)

    @property
    def in_shape(self) -> list[int]:
        return self.plan.layers[self.plan.blocks[self.recipe.block].layers[-1]].out_shape


RULES: dict[str, Callable[[AuxContext], nn.Module] | None] = {}


def register_rule(name: str):
    """Decorator: ``fn(ctx) -> aux net`` becomes selectable as ``rule=name`` (None: no aux nets)."""

    def wrap(fn):
        RULES[name] = fn
        return fn

    return wrap


def reset_parameters(module: nn.Module) -> nn.Module:
    """Re-initialise every submodule that knows how (``reset_parameters``), as a fresh layer would be."""
    for m in module.modules():
        fn = getattr(m, "reset_parameters", None)
        if callable(fn) and m is not module:
            fn()
    return module


@register_rule("auglocal")
def auglocal_aux(ctx: AuxContext) -> nn.Module:
    mods: list[nn.Module] = []
    shape = ctx.in_shape
    for j in ctx.recipe.selected_layers:
        layer = ctx.plan.layers[j]
        adapter = make_adapter(shape, layer.in_shape, ctx.norm2d)
        if adapter is not None:
            mods.append(adapter)
        mods.append(copy.deepcopy(ctx.layers[j]))
        shape = layer.out_shape
    adapter = make_adapter(shape, ctx.plan.head.in_shape, ctx.norm2d)
    if adapter is not None:
        mods.append(adapter)
    mods.append(copy.deepcopy(ctx.head))
    return nn.Sequential(*mods)


@register_rule("dgl")
def dgl_aux(ctx: AuxContext, hidden: int = 256) -> nn.Module:
    shape = ctx.in_shape
    if len(shape) == 3:
        c = shape[0]
        return nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False), ctx.norm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 1, bias=False), ctx.norm2d(c), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(4 * c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, ctx.num_classes))
    if len(shape) == 2:
        d = shape[1]
        return nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU(), _TokenMean(),
            nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, ctx.num_classes))
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], hidden), nn.ReLU(inplace=True), nn.Linear(hidden, ctx.num_classes))
    raise AugLocalError(f"the dgl rule has no aux head for activations of shape {shape}; use rule auglocal")


class _TokenMean(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


register_rule("bp")(None)
