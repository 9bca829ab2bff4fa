"""Light aux heads (``aux_head``): what an aux net ends with when copying the model's head costs too much.

AugLocal's aux nets end with a copy of the model's head. For most models that is a pooling and a
linear classifier, a few percent of the parameters; VGG's head is a ConvMlp (a 7x7 conv to 4096
channels, a 1x1 conv, then the classifier): about 93% of vgg11's parameters, so fifteen copies
would hold fifteen models. The reference code gives its VGG aux nets a small head instead
(``exp_imagenet/networks/auxiliary_nets.py``: the flat map pooled to 512, then Linear 512-512,
BN, ReLU, Linear 512-512, BN, ReLU, Linear to the classes).

Policy (``aux_head``): ``copy`` always copies the head; ``light`` always ends with a light head;
``auto`` (default) uses a light head when the model's head holds more than ``HEAVY_HEAD_SHARE``
(a quarter) of the model's parameters *and* every light head an aux net could end with (one per
layer's output) is smaller than the head: VGG's heads (over 80%, 100M+ against at most 0.5M),
while ResNets (8%), ViTs and ConvNeXts (a few %) keep their copies, and so do small mobile nets
whose conv head is a large share of a small model but still smaller than a 512-wide MLP
(``mobilenetv3_small_050`` at 10 classes: a 306k head, 53%, against light heads of up to 417k).

A light head takes the newest tensor the aux net hands it, with no shape adapter:
- a map (C, H, W) (or channels-last (H, W, C)): global average pool, then the reference's MLP:
  Linear(C, 512), BatchNorm1d, ReLU, Linear(512, 512), BatchNorm1d, ReLU, Linear(512, classes)
  (the reference pools the flat C*H*W vector to 512 numbers; pooling per channel keeps channels
  apart and does not depend on the resolution);
- tokens (T, D): the mean over tokens, then Linear(D, classes);
- a vector (D,): Linear(D, classes).
"""

from __future__ import annotations

from torch import nn

from ..errors import AugLocalError
from ..passes.layouts import channel_axis, has_channels, kind_of, resolve_layout, spatial_axes
from ..runtime.bundles import Chain, PickLast
from .adapters import TokenMean

__all__ = ["AUX_HEADS", "HEAVY_HEAD_SHARE", "LIGHT_WIDTH", "LightHead", "light_head", "input_kind"]

AUX_HEADS = ("copy", "light", "auto")
HEAVY_HEAD_SHARE = 0.25  # auto: a head above this share of the model's parameters is not copied
LIGHT_WIDTH = 512  # the reference's VGG aux head width (PlanConfig.light_width's default)


class _SpatialMean(nn.Module):
    """(N, C, H, W) -> (N, C), or (N, H, W, C) -> (N, C): the mean over the spatial axes."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.mean(dim=self.dims)


class LightHead(nn.Sequential):
    """A light head for per-sample input ``in_shape`` (``layout`` "nhwc": a channels-last map)."""

    def __init__(self, in_shape: list[int], layout: str, classes: int, hidden: int = LIGHT_WIDTH):
        kind, width = input_kind(in_shape, layout)
        if kind == "map":
            dims = tuple(a + 1 for a in spatial_axes(resolve_layout(in_shape, layout)))
            w = hidden
            mods = [_SpatialMean(dims), nn.Linear(width, w), nn.BatchNorm1d(w), nn.ReLU(inplace=True),
                    nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(inplace=True), nn.Linear(w, classes)]
        else:
            mods = ([TokenMean()] if kind == "tokens" else []) + [nn.Linear(width, classes)]
        super().__init__(*mods)
        self.in_shape, self.in_layout = list(in_shape), resolve_layout(in_shape, layout)  # FLOP counts, audit
        self.summary = f"light head ({'pool, MLP ' + str(hidden) if kind == 'map' else 'mean, linear' if kind == 'tokens' else 'linear'})"


def input_kind(shape: list[int], layout: str) -> tuple[str, int]:
    """("map" | "tokens" | "vector", channels) of a per-sample shape of ``layout``."""
    layout = resolve_layout(shape, layout)
    c = channel_axis(layout)
    if not has_channels(shape, layout):
        raise AugLocalError(f"a light aux head needs a map, tokens or a vector whose channel axis is known, not "
                            f"a tensor of shape {shape} (layout {layout!r}); use aux_head='copy'")
    return kind_of(layout), shape[c]


def light_head(bundle: list[list[int]], layouts: list[str], classes: int, width: int = LIGHT_WIDTH) -> nn.Module:
    """The light head for an aux net handing on ``bundle`` (oldest first): it takes the newest tensor."""
    head = LightHead(bundle[-1], layouts[-1], classes, width)
    return head if len(bundle) == 1 else Chain(PickLast(), head)

