"""The AugLocal rule: each aux net is copies of the plan's selected downstream layers (a shape
adapter wherever a copy would see another shape than in the backbone), then a copy of the head."""

from __future__ import annotations

import copy

from torch import nn

from ..adapters import make_adapter
from .rule import AuxContext, Rule, register_rule

__all__ = ["build_aux"]


def build_aux(ctx: AuxContext) -> nn.Module:
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


register_rule(Rule("auglocal", "aux nets copy uniformly selected later layers, then the head (the method)",
                   build_aux, copies_layers=True))
