"""The AugLocal rule: each aux net is copies of the plan's selected downstream layers (a shape
adapter wherever a copy would see another shape than in the backbone), then a copy of the head,
or a light head where the plan says so (``AuxRecipe.light_head``; ``light_head.py``).

Copied layers are graph pieces of the same model, so where the backbone hands a bundle (several
tensors) into a layer, its copy takes a bundle too; adapters act per tensor
(``adapters.make_bundle_adapter``)."""

from __future__ import annotations

import copy

from torch import nn

from ..assemble.adapters import bundle_sources, make_bundle_adapter
from ..assemble.light_head import light_head
from ..assemble.widen import widen
from ..errors import AugLocalError
from ..runtime.bundles import Chain
from .rule import AuxContext, Rule, register_rule

__all__ = ["build_aux"]


def build_aux(ctx: AuxContext) -> nn.Module:
    plan = ctx.plan
    last = plan.blocks[ctx.recipe.block].layers[-1]
    steps = [*ctx.recipe.selected_layers, len(plan.layers)]  # the copied layers, then the head
    pieces = [ctx.layers[j] if j < len(plan.layers) else ctx.head for j in steps]
    fed = [last, *steps[:-1]]  # the layer whose bundle each step is fed from
    light = ctx.recipe.light_head
    needed = _needed_inputs(plan, steps, pieces, fed, light)
    mods: list[nn.Module] = []
    for j, piece, need, f in zip(steps, pieces, needed, fed):
        if light and j == len(plan.layers):  # takes what it is handed: no adapter
            mods.append(light_head(plan.layers[f].bundle, plan.layers[f].layouts, ctx.num_classes,
                                   plan.config.light_width))
            break
        try:
            adapter = make_bundle_adapter(plan.layers[f].bundle, plan.bundle_into(j), ctx.norm2d,
                                          _kinds(plan, f), _kinds(plan, j - 1), need,
                                          plan.layers[f].layouts, plan.layouts_into(j))
        except AugLocalError as exc:  # name the place: which aux net, which tensor
            into = plan.layers[j].name if j < len(plan.layers) else "the head"
            raise AugLocalError(f"aux net of block {ctx.recipe.block}, from layer {plan.layers[f].name!r}'s "
                                f"output into a copy of {into!r}: {exc}") from exc
        copied = copy.deepcopy(piece)
        widened = (widen(adapter, copied) if adapter is not None and plan.config.adapters == "widen"
                   and j < len(plan.layers) else None)  # layers only: the head copy keeps its adapter
        if widened is not None:
            widened.layer = j  # for its FLOPs (synthesize)
            mods.append(widened)
        elif adapter is not None:
            mods += [adapter, copied]
        else:
            mods.append(copied)
    return Chain(*mods)


def _kinds(plan, j: int) -> list[str]:
    """What each slot of the bundle leaving layer ``j`` holds (a dtype, or a size kind)."""
    return plan.layers[j].kinds


def _needed_inputs(plan, steps: list[int], pieces: list, fed: list[int], light: bool = False) -> list[list[bool]]:
    """For each step, which tensors of the bundle it takes are read downstream: by the step itself,
    or handed on to a later step that reads them. The head reads whatever it takes; a light head,
    the newest tensor it is handed."""
    needed: list[list[bool]] = [[]] * len(steps)
    read_after: set[int] = set()  # output slots of the current step that later steps read
    for i in range(len(steps) - 1, -1, -1):
        if light and i == len(steps) - 1:
            read_after = {len(plan.layers[fed[i]].bundle) - 1}
            continue
        slots = len(plan.bundle_into(steps[i]))
        if i == len(steps) - 1:
            need = [True] * slots
        else:
            computes, handed = pieces[i].slot_use(slots)
            need = [c or bool(h & read_after) for c, h in zip(computes, handed)]
        needed[i] = need
        # what the adapter before step i reads of the bundle that step i - 1 hands on
        src, dst = plan.layers[fed[i]].bundle, plan.bundle_into(steps[i])
        sources, extras, _ = bundle_sources(src, dst, _kinds(plan, fed[i]), _kinds(plan, steps[i] - 1), need)
        read_after = {sources[k] for k, n in enumerate(need) if n} | set(extras)
    return needed


register_rule(Rule("auglocal", "aux nets copy uniformly selected later layers, then the head (the method)",
                   build_aux, copies_layers=True))
