"""The DGL baseline (Belilovsky et al. 2020): a small aux head independent of later layers — two 1x1
convs (a token MLP for (T, D) activations), pooling, a 2-layer MLP classifier."""

from __future__ import annotations

from torch import nn

from ..adapters import Permute, TokenMean
from ..errors import AugLocalError
from ..layouts import CHANNELS_LAST
from .rule import AuxContext, Rule, register_rule

__all__ = ["build_aux"]

HIDDEN = 256  # width of the classifier MLP


def build_aux(ctx: AuxContext) -> nn.Module:
    shape, classes = ctx.in_shape, ctx.num_classes
    if len(shape) == 3:
        last = ctx.in_layout == CHANNELS_LAST  # (H, W, C): convs need the channels first
        c = shape[2] if last else shape[0]
        return nn.Sequential(
            *([Permute(0, 3, 1, 2)] if last else []), nn.Conv2d(c, c, 1, bias=False), ctx.norm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 1, bias=False), ctx.norm2d(c), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(4 * c, HIDDEN), nn.ReLU(inplace=True), nn.Linear(HIDDEN, classes))
    if len(shape) == 2:
        d = shape[1]
        return nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU(), TokenMean(),
            nn.Linear(d, HIDDEN), nn.ReLU(inplace=True), nn.Linear(HIDDEN, classes))
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], HIDDEN), nn.ReLU(inplace=True), nn.Linear(HIDDEN, classes))
    raise AugLocalError(f"the dgl rule has no aux head for activations of shape {shape}; use rule='auglocal'")


register_rule(Rule("dgl", "small aux heads: 1x1 convs, pooling, an MLP (the DGL baseline)", build_aux))
