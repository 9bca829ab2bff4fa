"""The axis audit: every adapter and aux head acts with its weights on the channel axis only.

An adapter (``adapters.py``) or a baseline's aux head (``rules/``) is built from a tensor's measured
layout. This audit checks what was built by running it, not by reading how it was built: on fake
tensors (nothing computed), each axis of its input is resized in turn, and the axes the module
cannot take at another size are the ones a learned weight contracts. The channel axis must be one
of them where the module holds weights; no spatial or sequence axis may be. Flattening a map after
pooling it to a fixed grid (the reference DGL head's 2x2 pooling) passes, since any input size
pools to the same grid, and is named as such.

Example:
    >>> checks = audit_axes(to_auglocal(model, 8))
    >>> [c.line() for c in checks if not c.ok]
    []
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..modes import eval_mode
from ..passes.layouts import UNKNOWN, channel_axis, resolve_layout, spatial_axes
from ..passes.profiler import fake_state
from ..runtime.bundles import Chain, PickLast
from .adapters import Adapter
from .light_head import LightHead

__all__ = ["AxisCheck", "audit_aux", "audit_axes", "audit_module"]


@dataclass
class AxisCheck:
    """One module's audit: the axes of its input (letters of ``layout`` after the batch) that its
    weights contract; ``ok`` when that is the channel axis alone (or nothing, for a weightless one)."""

    where: str  # e.g. "aux 3: conv1x1/2->512x28x28 (nchw)"
    layout: str
    in_shape: list[int]
    contracted: list[str] = field(default_factory=list)  # e.g. ["c"]
    ok: bool = True
    note: str = ""  # e.g. "flattens a map pooled to a fixed grid"

    def line(self) -> str:
        axes = "+".join(self.contracted) or "none"
        return (f"{self.where}: input {self.in_shape} ({self.layout}) contracted along {axes}"
                f"{'; ' + self.note if self.note else ''}{'' if self.ok else ' -- NOT the channel axis alone'}")


def audit_module(module: nn.Module, in_shape: list[int], layout: str, where: str) -> AxisCheck:
    """Resize each axis of ``module``'s input in turn (fake tensors) and record which it cannot take."""
    layout = resolve_layout(in_shape, layout)
    check = AxisCheck(where, layout, list(in_shape))
    if layout == UNKNOWN or len(layout) != len(in_shape) + 1:
        check.ok, check.note = False, "the input's layout is unknown"
        return check
    c = channel_axis(layout)
    for axis in range(len(in_shape)):
        shape = list(in_shape)
        shape[axis] = shape[axis] + 1 if axis == c else 2 * shape[axis]
        if not _runs(module, shape):
            check.contracted.append(layout[axis + 1])
    weighted = any(p.requires_grad for p in module.parameters())
    spatial = {layout[a + 1] for a in spatial_axes(layout)}
    check.ok = not (spatial & set(check.contracted)) and (not weighted or c is None or "c" in check.contracted)
    if any(isinstance(m, nn.Flatten) for m in module.modules()) and spatial:
        check.note = "flattens a map pooled to a fixed grid"
    return check


def _runs(module: nn.Module, shape: list[int]) -> bool:
    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # it logs each refused op's traceback
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with (eval_mode(module), FakeTensorMode(allow_non_fake_inputs=True) as fake, fake_state(module, fake),
              torch.no_grad()):
            module(fake.from_tensor(torch.zeros(2, *shape)))
    except Exception:  # any op refusing the size: a shape error, a reshape to a fixed size
        return False
    finally:
        quiet.setLevel(level)
    return True


def audit_axes(net) -> list[AxisCheck]:
    """One ``AxisCheck`` per adapter and light head of ``net``'s aux nets, and per aux head of a
    rule that builds its own (dgl, infopro, predsim)."""
    return audit_aux(net.plan, list(net.aux))


def audit_aux(plan, aux_nets: list[nn.Module]) -> list[AxisCheck]:
    """``audit_axes`` of the aux nets built from ``plan`` (``synthesize.synthesize_aux``)."""
    from ..rules import get_rule  # the rules import adapters: keep this module importable on its own

    checks = []
    rule = get_rule(plan.config.rule)
    for recipe, aux in zip(plan.aux, aux_nets):
        tag = f"aux {recipe.block}"
        if rule.copies_layers:
            for m in aux.modules():
                if isinstance(m, Adapter | LightHead) and m.in_shape is not None:
                    checks.append(audit_module(m, m.in_shape, m.in_layout, f"{tag}: {m.summary}"))
            continue
        head = aux[-1] if isinstance(aux, Chain) and isinstance(aux[0], PickLast) else aux
        layer = plan.layers[plan.blocks[recipe.block].layers[-1]]
        checks.append(audit_module(head, layer.bundle[-1], layer.layouts[-1], f"{tag}: {rule.name} head"))
    return checks
