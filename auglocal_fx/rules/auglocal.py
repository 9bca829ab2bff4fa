"""The AugLocal rule: each aux net is copies of the plan's selected downstream layers (a shape
adapter wherever a copy would see another shape than in the backbone), then a copy of the head.

Copied layers are graph pieces of the same model, so where the backbone hands a bundle (several
tensors) into a layer, its copy takes a bundle too; adapters act per tensor
(``adapters.make_bundle_adapter``)."""

from __future__ import annotations

import copy

from torch import nn

from ..adapters import bundle_sources, make_bundle_adapter
from ..bundles import Chain
from .rule import AuxContext, Rule, register_rule

__all__ = ["build_aux"]


def build_aux(ctx: AuxContext) -> nn.Module:
    plan = ctx.plan
    last = plan.blocks[ctx.recipe.block].layers[-1]
    steps = [*ctx.recipe.selected_layers, len(plan.layers)]  # the copied layers, then the head
    pieces = [ctx.layers[j] if j < len(plan.layers) else ctx.head for j in steps]
    outs = [plan.layers[last].bundle] + [plan.layers[j].bundle for j in steps[:-1]]  # what each step is fed from
    needed = _needed_inputs(plan, steps, pieces, outs)
    mods: list[nn.Module] = []
    shapes, dtypes = outs[0], plan.layers[last].crossing_dtypes
    for j, piece, need in zip(steps, pieces, needed):
        into, into_dtypes = plan.bundle_into(j), plan.layers[j - 1].crossing_dtypes
        adapter = make_bundle_adapter(shapes, into, ctx.norm2d, dtypes, into_dtypes, need)
        if adapter is not None:
            mods.append(adapter)
        mods.append(copy.deepcopy(piece))
        if j < len(plan.layers):
            shapes, dtypes = plan.layers[j].bundle, plan.layers[j].crossing_dtypes
    return Chain(*mods)


def _needed_inputs(plan, steps: list[int], pieces: list, outs: list) -> list[list[bool]]:
    """For each step, which tensors of the bundle it takes are read downstream: by the step itself,
    or handed on to a later step that reads them. The head reads whatever it takes."""
    needed: list[list[bool]] = [[]] * len(steps)
    read_after: set[int] = set()  # output slots of the current step that later steps read
    for i in range(len(steps) - 1, -1, -1):
        slots = len(plan.bundle_into(steps[i]))
        if i == len(steps) - 1:
            need = [True] * slots
        else:
            computes, handed = pieces[i].slot_use(slots)
            need = [c or bool(h & read_after) for c, h in zip(computes, handed)]
        needed[i] = need
        sources = bundle_sources(len(outs[i]), slots)  # the adapter before step i, if any
        read_after = {sources[k] for k, n in enumerate(need) if n}
    return needed


register_rule(Rule("auglocal", "aux nets copy uniformly selected later layers, then the head (the method)",
                   build_aux, copies_layers=True))
