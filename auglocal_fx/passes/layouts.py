"""Which axis of an activation is the batch, which the channels, which spatial: tensor layouts.

A layout is a string with one letter per axis, batch first: ``"nchw"`` (2-d maps, channels first),
``"nhwc"`` (channels last: Swin, ConvNeXt blocks), ``"ncl"`` (1-d maps: audio, time series),
``"ncdhw"`` / ``"ndhwc"`` (3-d maps: video), ``"ntc"`` (tokens (N, T, D), also channels-last 1-d
maps), ``"nc"`` (flat vectors), ``"nl"`` (a sequence without channels: token ids, a flattened map).
``UNKNOWN`` (``"?"``) marks a tensor whose axes could not be told.

The layout is measured (``axes.py``: shapes at two input sizes). This module holds the vocabulary and
the fallback for models that run at one size only: reading the graph. The ops that read the tensor
decide (a Conv / BatchNorm / pooling reads channels first; a Linear / LayerNorm over the last axis
reads channels last; ``permute(0, 3, 1, 2)`` turns channels-last into channels-first), else the op
that made it. Elementwise ops in between (adds, activations, drop-path) are looked through.
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

__all__ = ["CHANNELS_FIRST", "CHANNELS_LAST", "MAP1D", "MAP3D", "NDHWC", "SEQUENCE", "TOKENS", "UNKNOWN", "VECTOR",
           "channel_axis", "channels_first", "has_channels", "kind_of", "is_channels_last", "layout_for", "read_layout", "resolve_layout",
           "spatial_axes"]

VECTOR, SEQUENCE, TOKENS, MAP1D = "nc", "nl", "ntc", "ncl"
CHANNELS_FIRST, CHANNELS_LAST, MAP3D, NDHWC = "nchw", "nhwc", "ncdhw", "ndhwc"
UNKNOWN = "?"
_BY_CHANNEL_AXIS = {  # (rank with batch, axis of the channels) -> layout
    (2, 1): VECTOR, (3, 1): MAP1D, (3, 2): TOKENS, (4, 1): CHANNELS_FIRST, (4, 3): CHANNELS_LAST,
    (5, 1): MAP3D, (5, 4): NDHWC,
}
_FIRST_OF = {CHANNELS_LAST: CHANNELS_FIRST, NDHWC: MAP3D}


def layout_for(rank: int, channels: int | None) -> str:
    """The layout of a tensor of ``rank`` axes (batch included) whose channels are on axis ``channels``
    (None: no channel axis), or ``UNKNOWN`` where no layout has channels there."""
    if channels is None:
        return SEQUENCE if rank == 2 else UNKNOWN
    return _BY_CHANNEL_AXIS.get((rank, channels), UNKNOWN)


def resolve_layout(shape: list[int], layout: str) -> str:
    """``layout`` of a tensor of per-sample ``shape``; plans written before layouts were measured
    hold "" (channels-last maps alone were marked): what those plans assumed by rank."""
    if layout:
        return layout
    return {1: VECTOR, 2: TOKENS, 3: CHANNELS_FIRST}.get(len(shape), UNKNOWN)


def has_channels(shape: list[int], layout: str) -> bool:
    """Whether ``layout`` (resolved) names the channel axis of a tensor of per-sample ``shape``."""
    return layout != UNKNOWN and "c" in layout and len(layout) == len(shape) + 1


def kind_of(layout: str) -> str:
    """What a tensor of ``layout`` is to an adapter or a head: "vector", "tokens" or "map"."""
    return {VECTOR: "vector", TOKENS: "tokens"}.get(layout, "map")


def channel_axis(layout: str) -> int | None:
    """Per-sample index (batch excluded) of the channel axis, or None."""
    return layout.index("c") - 1 if "c" in layout else None


def spatial_axes(layout: str) -> list[int]:
    """Per-sample indices of the spatial / sequence axes (every axis but batch and channels)."""
    return [i - 1 for i, a in enumerate(layout) if a not in "nc"]


def is_channels_last(layout: str) -> bool:
    """A map with its channels after its spatial axes, which convs cannot take as it is."""
    return layout in _FIRST_OF


def channels_first(layout: str) -> str:
    """The channels-first layout of the same map (``"nhwc"`` -> ``"nchw"``); others unchanged."""
    return _FIRST_OF.get(layout, layout)


# -- the fallback: reading the graph ----------------------------------------------------------------
_FIRST_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                  nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, LayerNorm2d,
                  nn.LocalResponseNorm)
_LAST_MODULES = (nn.Linear, nn.LayerNorm)
_FIRST_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm, F.max_pool1d, F.max_pool2d,
                    F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                    torch.conv1d, torch.conv2d, torch.conv3d}
_LAST_FUNCTIONS = {F.linear, F.layer_norm}
_PERMUTES = {"permute", torch.permute}
_RESHAPES = {"reshape", "view", "flatten", "unflatten", torch.reshape, torch.flatten}
_TRANSPOSES = {"transpose", torch.transpose}
_ELEMENTWISE_DEPTH = 8  # how far through shape-keeping ops to look for a decisive op
_FIRST, _LAST = "first", "last"


def _shape(n) -> tuple | None:
    return n.meta.get("shape") if isinstance(n, fx.Node) else None


def _permute_dims(n: fx.Node) -> tuple | None:
    dims = n.args[1:] if n.target == "permute" else n.args[1:] or (n.kwargs.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], tuple | list):
        dims = tuple(dims[0])
    rank = len(_shape(n) or dims)
    return tuple(d % rank if isinstance(d, int) else d for d in dims)


def _moves(dims: tuple | None) -> str | None:
    """What a permute does to a map: ``(0, 2, 3, 1)`` moves channels last, ``(0, 3, 1, 2)`` first."""
    if not dims or len(dims) < 4 or dims[0] != 0:  # (0, 2, 1) swaps the two axes of a 1-d map: says neither
        return None
    r = len(dims)
    if dims == (0, *range(2, r), 1):
        return _LAST
    if dims == (0, r - 1, *range(1, r - 1)):
        return _FIRST
    return None


def _reshaped(map_shape: tuple, other: tuple | None) -> str | None:
    """Which end the channels of a map are at, if a reshape between it and ``other`` keeps only that
    axis whole: (N, H, W, C) <-> (N, H*W, C) or (N, H/2, 2, W/2, 2, C) keeps the last; (N, C, H*W)
    the first. A reshape that keeps the spatial axes and splits the first one, (N, C, H, W) ->
    (N, g, C/g, H, W) (a channel shuffle), is channels first."""
    if other is None or len(other) < 3 or other == map_shape:
        return None
    n, k = map_shape, len(map_shape)
    if len(other) == k + 1 and other[1] * other[2] == n[1] and tuple(other[3:]) == tuple(n[2:]):
        return _FIRST  # the spatial axes kept whole, the first axis split in two: a channel shuffle
    last = other[-1] == n[-1] and math.prod(other[1:-1]) == math.prod(n[1:-1])
    first = other[1] == n[1] and math.prod(other[2:]) == math.prod(n[2:])
    return _LAST if last and not first else _FIRST if first and not last else None


def _fixed_end(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """The end ``n``'s op keeps channels at whatever it is given: convs, norms and pools read and
    write maps channels first (``_FIRST_MODULES`` / ``_FIRST_FUNCTIONS``), LayerNorm over the last
    axis channels last; None for any other op."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        return _FIRST if isinstance(mod, _FIRST_MODULES) else _LAST if isinstance(mod, _LAST_MODULES) else None
    if n.op in ("call_function", "call_method"):
        return _FIRST if n.target in _FIRST_FUNCTIONS else _LAST if n.target in _LAST_FUNCTIONS else None
    return None


def _reads(gm: fx.GraphModule, user: fx.Node, t: fx.Node) -> str | None:
    """Which end ``user`` reads the channels of ``t`` at, if ``user`` decides it."""
    if not user.args or user.args[0] is not t:
        return None
    end = _fixed_end(gm, user)
    if end is not None or user.op not in ("call_function", "call_method"):
        return end
    if user.target in _PERMUTES:
        moved = _moves(_permute_dims(user))  # moving channels last means they were first
        return {_LAST: _FIRST, _FIRST: _LAST}.get(moved)
    if user.target in _RESHAPES and len(_shape(t) or ()) >= 4:
        return _reshaped(_shape(t), _shape(user))
    return None


def _made(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """Which end ``n``'s own op leaves the channels at, if it decides it."""
    end = _fixed_end(gm, n)  # convs, norms and pools write maps as they read them
    if end is not None or n.op not in ("call_function", "call_method"):
        return end
    if n.target in _PERMUTES:
        return _moves(_permute_dims(n))
    if n.target in _RESHAPES and n.args and len(_shape(n) or ()) >= 4:
        return _reshaped(_shape(n), _shape(n.args[0]))
    if n.target in _TRANSPOSES and _swaps_last_two(n) and isinstance(n.args[0], fx.Node):
        # (N, T, C) <-> (N, C, T): the channels end where the input's op left them, swapped
        return {_FIRST: _LAST, _LAST: _FIRST}.get(_made(gm, n.args[0]))
    return None


def _swaps_last_two(n: fx.Node) -> bool:
    """``x.transpose(1, 2)`` (or (-1, -2), ...) on a 3-d tensor."""
    dims = tuple(n.args[1:3]) if len(n.args) >= 3 else (n.kwargs.get("dim0"), n.kwargs.get("dim1"))
    if len(_shape(n) or ()) != 3 or not all(isinstance(d, int) for d in dims):
        return False
    return sorted(d % 3 for d in dims) == [1, 2]


def _same_layout_neighbours(n: fx.Node, forward: bool) -> list[fx.Node]:
    """Ops next to ``n`` whose tensors have its layout: those that keep its shape (elementwise: adds,
    activations, dropout, drop-path) and concatenations of tensors of its rank (a class token
    joining the patch tokens)."""
    shape = _shape(n)
    near = list(n.users) if forward else n.all_input_nodes
    joins = n.target is torch.cat if not forward else False  # a cat's inputs have its layout too
    return [m for m in near if m.op != "output" and m.target is not operator.getitem and
            (_shape(m) == shape or ((m.target is torch.cat or joins) and shape is not None
                                    and len(_shape(m) or ()) == len(shape)))]


def read_layout(gm: fx.GraphModule, t: fx.Node) -> str:
    """The layout the graph around ``t`` implies (batch first), or ``UNKNOWN`` when no op near it
    decides: the fallback to measuring (``axes.py``) for models that run at one size only.

    Looks downstream first (how the next layer reads the tensor), then upstream (how it was made).
    A vector (N, D) is ``"nc"`` whatever reads it.
    """
    shape = _shape(t)
    if shape is None or len(shape) < 2:
        return UNKNOWN
    if len(shape) == 2:
        return VECTOR
    for forward in (True, False):
        seen, queue = {t}, deque([(t, 0)])
        while queue:
            n, depth = queue.popleft()
            found = None
            if forward:
                found = next((f for f in (_reads(gm, user, n) for user in n.users) if f), None)
            else:
                found = _made(gm, n)
            if found:
                return layout_for(len(shape), 1 if found == _FIRST else len(shape) - 1)
            if depth < _ELEMENTWISE_DEPTH:
                for m in _same_layout_neighbours(n, forward):
                    if m not in seen:
                        seen.add(m)
                        queue.append((m, depth + 1))
    return UNKNOWN
