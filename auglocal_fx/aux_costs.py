"""The cost model's aux nets: what one aux net holds, estimated from the layers it copies.

Parameters and activation bytes per sample of an aux net are its copies' profiled figures, plus
what it adds where its input differs from what a copy took in the backbone (an adapter: a 1x1 conv
and norm, or a linear; or a widened copy's rebuilt convolutions), plus its head (the model's, or a
light head, ``light_head_info``). ``aux_figures`` / ``aux_extra`` give these per block for the
partition's cost closures, from the method's selection rules (``passes/selection.py``).
``costs.py`` builds on them: what a unit (a block with its aux net) and a whole step hold.
"""

from __future__ import annotations

import functools
import math

from .assemble.light_head import LIGHT_WIDTH, input_kind
from .passes.layouts import SEQUENCE, TOKENS, UNKNOWN, VECTOR, channel_axis, is_channels_last, resolve_layout
from .passes.partition import Extra
from .passes.selection import apply_tail, pyramid_depths, select_layers
from .plan import LayerInfo

__all__ = ["aux_act_bytes", "aux_params", "light_head_info", "aux_figures", "aux_extra"]


def aux_act_bytes(layers: list[LayerInfo], head: LayerInfo, last: int, selected: list[int],
                  light: bool = False, width: int = LIGHT_WIDTH, widen: bool = True) -> int:
    """Estimated activation bytes (per sample) of an aux net that copies layers ``selected`` after a
    block ending at layer ``last`` (``light``: then a light head of hidden ``width`` instead of the
    model's head; ``widen``: copies widened where they can be, ``PlanConfig.adapters``).

    Copied layers see the shapes they see in the backbone, so they save what they save there; a
    map adapter's norm also saves its conv's output (for every tensor of a bundle it makes);
    the head copy saves what the head does, a light head what ``light_head_info`` estimates. A
    widened copy's convolutions save the tensor handed to them, which the step before saves too.
    """
    total = sum(_step_figures(layers, j, src, dst, widen)[1] for j, src, dst in
                _adapted_steps(layers, last, selected, light))
    return total + _aux_head(layers, head, last, selected, light, width).act_bytes + \
        sum(layers[j].act_bytes for j in selected)


def aux_params(layers: list[LayerInfo], head: LayerInfo, last: int, selected: list[int], light: bool = False,
               width: int = LIGHT_WIDTH, widen: bool = True) -> int:
    """Estimated parameters of the aux net ``aux_act_bytes`` describes: its copies and head as
    profiled (or the light head's), plus a 1x1 conv (or linear) and norm per adapter where the
    channels change, or a widened copy's rebuilt convolutions (and the adapter it keeps)."""
    total = sum(_step_figures(layers, j, src, dst, widen)[0] for j, src, dst in
                _adapted_steps(layers, last, selected, light))
    return total + _aux_head(layers, head, last, selected, light, width).params + \
        sum(layers[j].params for j in selected)


def _step_figures(layers: list[LayerInfo], j: int, src, dst, widen: bool) -> tuple[int, int]:
    """``(parameters, activation bytes per sample)`` an adapted step adds beside its copy's profiled
    figures: a widened copy's change, else the adapter's (a map adapter's norm saves its conv's output)."""
    change = _widening(layers, j, src, dst) if widen else None
    if change is not None:
        return change
    params = sum(_adapter_params(a, b, la, lb) for a, b, la, lb in
                 zip(src[0][-len(dst[0]):], dst[0], src[1][-len(dst[0]):], dst[1]))
    acts = sum(4 * math.prod(t) for t, lay in zip(dst[0], dst[1]) if _is_map(resolve_layout(t, lay)))  # float32
    return params, acts


def _adapted_steps(layers: list[LayerInfo], last: int, selected: list[int], light: bool):
    """``(j, (shapes, layouts) handed on, (shapes, layouts) step j takes)`` for each step of the aux
    net whose input differs from what it took in the backbone (an adapter or a widened copy goes there)."""
    bundle, lays = layers[last].bundle, layers[last].layouts
    for j in _copy_steps(layers, selected, light):
        into, into_lays = layers[j - 1].bundle, layers[j - 1].layouts
        if into != bundle:
            yield j, (bundle, lays), (into, into_lays)
        bundle, lays = (layers[j].bundle, layers[j].layouts) if j < len(layers) else (into, into_lays)


def _widening(layers: list[LayerInfo], j: int, src, dst) -> tuple[int, int] | None:
    """``(parameters, activation bytes)`` of step ``j`` as a widened copy adds them beside the copy's
    profiled figures, or None where ``assemble/widen.py`` keeps an adapter in front: it widens a
    copy that takes one channels-first map through plain convolutions, where the adapter would be a
    1x1 conv + norm with one integer stride on every axis."""
    if j >= len(layers) or not layers[j].entry_convs or len(src[0]) != 1 or len(dst[0]) != 1:
        return None
    (a,), (b,) = src[0], dst[0]
    la, lb = resolve_layout(a, src[1][0]), resolve_layout(b, dst[1][0])
    if not (_is_map(la) and _is_map(lb)) or is_channels_last(la) or is_channels_last(lb) or len(a) != len(b):
        return None
    ratios = {x // y if y and x % y == 0 else 0 for x, y in zip(a[1:], b[1:])}
    (c, c2), convs = (a[0], b[0]), layers[j].entry_convs
    if len(ratios) != 1 or 0 in ratios or any(conv[0] != c2 for conv in convs):
        return None
    params = sum(out * k * (c - c2) for _, out, k, _ in convs)  # each conv reads c channels instead of c2
    acts = -4 * math.prod(b) if layers[j].entry_others != "saves" else 0  # they save the handed tensor
    if layers[j].entry_others:  # the adapter stays, on the other readers' path
        params += _adapter_params(a, b, la, lb)
        acts += 4 * math.prod(b)
    return params, acts


def _copy_steps(layers: list[LayerInfo], selected: list[int], light: bool) -> list[int]:
    """The steps of an aux net an adapter may precede: its copies, and the head unless light
    (a light head takes whatever it is handed)."""
    return list(selected) if light else [*selected, len(layers)]


def _aux_head(layers: list[LayerInfo], head: LayerInfo, last: int, selected: list[int], light: bool,
              width: int) -> LayerInfo:
    """What an aux net ends with: the model's head, or a light head on the newest tensor it is handed."""
    if not light:
        return head
    fed = layers[selected[-1] if selected else last]
    return light_head_info(fed.bundle[-1], fed.layouts[-1], head.out_shape[-1] if head.out_shape else 0, width)


def _adapter_params(src: list[int], dst: list[int], src_layout: str = "", dst_layout: str = "") -> int:
    """A map's 1x1 conv + norm wherever the shape changes (a strided conv when only the resolution
    does), or a (T, D) sequence's linear where the channels change; channels found by layout."""
    ls, ld = resolve_layout(src, src_layout), resolve_layout(dst, dst_layout)
    c, c2 = _width(src, ls), _width(dst, ld)
    maps = _is_map(ls) and _is_map(ld)
    if maps and src != dst:
        return c * c2 + 2 * c2
    if c == c2:
        return 0
    return c * c2 + (2 * c2 if _is_map(ld) else c2)


def _width(shape: list[int], layout: str) -> int:
    axis = channel_axis(layout)
    return shape[axis] if axis is not None and axis < len(shape) else (shape[-1] if shape else 0)


def _is_map(layout: str) -> bool:
    return layout not in (TOKENS, VECTOR, SEQUENCE, UNKNOWN)


def light_head_info(in_shape: list[int], layout: str, classes: int, width: int = LIGHT_WIDTH) -> LayerInfo:
    """The light head's figures, as a ``LayerInfo`` for the cost model: parameters exactly, FLOPs as
    ``torch.utils.flop_counter`` counts them (matmuls), and the bytes it saves for backward per sample
    as measured with ``SavedTensorMeter`` (a linear's input, each norm's input and output; the pooling saves none)."""
    kind, c = input_kind(in_shape, layout)
    w, k = width, classes
    if kind == "map":
        params = (c * w + w) + 2 * w + (w * w + w) + 2 * w + (w * k + k)
        flops = 2 * (c * w + w * w + w * k)
        act = 4 * (c + 5 * w)
    else:
        params, flops, act = c * k + k, 2 * c * k, 4 * c
    return LayerInfo(name="light head", boundary="output", in_shape=list(in_shape), out_shape=[k], params=params,
                     flops=flops, act_bytes=act)


def aux_figures(layers: list[LayerInfo], head: LayerInfo, blocks: int, aux_depth: int, pyramid: float,
                 tail: str, copies: bool, light: bool = False, width: int = LIGHT_WIDTH, widen: bool = True):
    """``(j, last) -> (params, activation bytes per sample)`` of what block j trains with beside its
    own layers: its aux net (estimated from the copies, ending with a light head when ``light``;
    nothing for a rule whose aux nets copy no layers) or, for the block that trains with the model's
    head, the head. Memoised."""
    kept = len(apply_tail([[i] for i in range(blocks)], aux_depth, tail))  # blocks left after the tail
    depths = pyramid_depths(kept - 1, aux_depth, pyramid)
    n = len(layers)

    @functools.cache
    def figures(j: int, last: int) -> tuple[int, int]:
        if j >= kept - 1:  # merged into (or is) the last block, trained by the model's head
            return (head.params, head.act_bytes - head.shared_bytes) if j == blocks - 1 else (0, 0)
        if not copies:
            return 0, 0
        selected = select_layers(last, n, depths[j])
        return (aux_params(layers, head, last, selected, light, width, widen),
                aux_act_bytes(layers, head, last, selected, light, width, widen))

    return figures


def aux_extra(layers: list[LayerInfo], head: LayerInfo, blocks: int, aux_depth: int, pyramid: float,
               tail: str, light: bool, width: int = LIGHT_WIDTH, widen: bool = True) -> Extra:
    """``extra(j, last)`` for a balance that weighs aux nets: what block j's aux net (or, for the
    block that trains with the model's head, the head) holds alive beside the block's own activations."""
    aux = aux_figures(layers, head, blocks, aux_depth, pyramid, tail, copies=True, light=light, width=width,
                      widen=widen)
    return lambda j, last: aux(j, last)[1]

