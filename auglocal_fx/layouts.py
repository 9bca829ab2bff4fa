"""Which axis of a feature map holds the channels: (N, C, H, W) or channels-last (N, H, W, C).

Shapes alone cannot tell (a 56x56x96 Swin map and a 56-channel 56x96 map look alike), so the graph
decides: the ops that read the tensor (a Conv2d / BatchNorm2d / 2-d pooling reads channels first; a
Linear / LayerNorm over the last axis reads channels last; ``permute(0, 3, 1, 2)`` turns channels-last
into channels-first), else the op that made it. Elementwise ops in between (adds, activations,
drop-path) are looked through. Nothing decisive: channels first, as timm's and torchvision's CNNs.
"""

from __future__ import annotations

import math
import operator
from collections import deque

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["CHANNELS_FIRST", "CHANNELS_LAST", "TOKENS", "layout_of"]

CHANNELS_FIRST, CHANNELS_LAST, TOKENS = "nchw", "nhwc", ""  # TOKENS: any tensor that is not a 2-d map

_FIRST_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                  nn.AdaptiveMaxPool2d, LayerNorm2d, nn.LocalResponseNorm)
_LAST_MODULES = (nn.Linear, nn.LayerNorm)
_FIRST_FUNCTIONS = {F.conv2d, F.batch_norm, F.group_norm, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                    F.adaptive_max_pool2d, torch.conv2d}
_LAST_FUNCTIONS = {F.linear, F.layer_norm}
_PERMUTES = {"permute", torch.permute}
_RESHAPES = {"reshape", "view", "flatten", "unflatten", torch.reshape, torch.flatten}
_ELEMENTWISE_DEPTH = 8  # how far through shape-keeping ops to look for a decisive op


def _shape(n) -> tuple | None:
    return n.meta.get("shape") if isinstance(n, fx.Node) else None


def _permute_dims(n: fx.Node) -> tuple | None:
    dims = n.args[1:] if n.target == "permute" else n.args[1:] or (n.kwargs.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], tuple | list):
        dims = tuple(dims[0])
    return tuple(d % 4 if isinstance(d, int) else d for d in dims)


def _reshaped(map_shape: tuple, other: tuple | None) -> str | None:
    """The layout under which a reshape between a 4-d map and ``other`` keeps the channel axis whole:
    (N, H, W, C) <-> (N, H*W, C) or (N, H/2, 2, W/2, 2, C) keeps the last; (N, C, H*W) the first."""
    if other is None or len(other) < 3 or other == map_shape:
        return None
    n = map_shape
    last = other[-1] == n[-1] and math.prod(other[1:-1]) == n[1] * n[2]
    first = other[1] == n[1] and math.prod(other[2:]) == n[2] * n[3]
    return CHANNELS_LAST if last and not first else CHANNELS_FIRST if first and not last else None


def _reads(gm: fx.GraphModule, user: fx.Node, t: fx.Node) -> str | None:
    """The layout ``user`` reads ``t`` in, if ``user`` decides it."""
    if not user.args or user.args[0] is not t:
        return None
    if user.op == "call_module":
        mod = gm.get_submodule(user.target)
        if isinstance(mod, _FIRST_MODULES):
            return CHANNELS_FIRST
        if isinstance(mod, _LAST_MODULES):
            return CHANNELS_LAST
        return None
    if user.op in ("call_function", "call_method"):
        if user.target in _FIRST_FUNCTIONS:
            return CHANNELS_FIRST
        if user.target in _LAST_FUNCTIONS:
            return CHANNELS_LAST
        if user.target in _PERMUTES:
            dims = _permute_dims(user)
            return {(0, 3, 1, 2): CHANNELS_LAST, (0, 2, 3, 1): CHANNELS_FIRST}.get(dims)
        if user.target in _RESHAPES:
            return _reshaped(_shape(t), _shape(user))
    return None


def _made(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """The layout ``n``'s own op leaves its output in, if it decides it."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.modules.batchnorm._BatchNorm, LayerNorm2d)):
            return CHANNELS_FIRST
        if isinstance(mod, _LAST_MODULES):
            return CHANNELS_LAST
    elif n.op in ("call_function", "call_method"):
        if n.target in (F.conv2d, torch.conv2d, F.batch_norm):
            return CHANNELS_FIRST
        if n.target in _LAST_FUNCTIONS:
            return CHANNELS_LAST
        if n.target in _PERMUTES:
            return {(0, 3, 1, 2): CHANNELS_FIRST, (0, 2, 3, 1): CHANNELS_LAST}.get(_permute_dims(n))
        if n.target in _RESHAPES and n.args and len(_shape(n) or ()) == 4:
            return _reshaped(_shape(n), _shape(n.args[0]))
    return None


def _same_shape_neighbours(n: fx.Node, forward: bool) -> list[fx.Node]:
    """Ops next to ``n`` that keep its shape (elementwise: adds, activations, dropout, drop-path)."""
    shape = _shape(n)
    near = list(n.users) if forward else n.all_input_nodes
    return [m for m in near if m.op != "output" and _shape(m) == shape and m.target is not operator.getitem]


def layout_of(gm: fx.GraphModule, t: fx.Node) -> str:
    """``"nhwc"`` or ``"nchw"`` for a node whose value is a 4-d tensor (batch first); ``""`` otherwise.

    Looks downstream first (how the next layer reads the tensor), then upstream (how it was made).
    """
    shape = _shape(t)
    if shape is None or len(shape) != 4:
        return TOKENS
    for forward in (True, False):
        seen, queue = {t}, deque([(t, 0)])
        while queue:
            n, depth = queue.popleft()
            if forward:
                for user in n.users:
                    found = _reads(gm, user, n)
                    if found:
                        return found
            else:
                found = _made(gm, n)
                if found:
                    return found
            if depth < _ELEMENTWISE_DEPTH:
                for m in _same_shape_neighbours(n, forward):
                    if m not in seen:
                        seen.add(m)
                        queue.append((m, depth + 1))
    return CHANNELS_FIRST
