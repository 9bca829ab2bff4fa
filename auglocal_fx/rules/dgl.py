"""The DGL baseline (Belilovsky et al. 2020) as the AugLocal reference code builds it
(``networks/auxiliary_nets.py``, ``AuxNetwork`` with ``net_config == 'DGL'``).

For a (C, H, W) map: adaptive average pool to ceil(H/4) x ceil(W/4); three times a 1x1 conv
(C -> C, no bias), norm, ReLU; adaptive average pool to at most 2 x 2; flatten (F = 4C); twice a
Linear(F, F, no bias), BatchNorm1d, ReLU; a Linear to the classes. Cross-entropy (the step's
``loss_fn``). On CIFAR ResNet-32 that costs about 0.02x the backbone's FLOPs for 15 aux nets.

Ours beyond the reference: the norms follow the model's kind (a GroupNorm model gets GroupNorm,
no batch statistics); channels-last maps are permuted first; (T, D) tokens take the token axis as
the flattened spatial one: pool the tokens to ceil(T/16), three times a per-token Linear(D, D, no
bias), LayerNorm, ReLU, then the mean over tokens (F = D; tokens have no 2 x 2 layout) and the
same MLP; (D,) features get the MLP alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from ..adapters import Permute, TokenMean, TokenPool
from ..errors import AugLocalError
from ..layouts import CHANNELS_LAST
from .rule import AuxContext, Rule, register_rule

__all__ = ["build_aux", "norm1d_like"]


def build_aux(ctx: AuxContext) -> nn.Module:
    shape, classes = ctx.in_shape, ctx.num_classes
    if len(shape) == 3:
        last = ctx.in_layout == CHANNELS_LAST  # (H, W, C): convs need the channels first
        c, h, w = (shape[2], shape[0], shape[1]) if last else shape
        first = (math.ceil(h / 4), math.ceil(w / 4))
        second = (min(first[0], 2), min(first[1], 2))
        f = c * second[0] * second[1]
        convs = [m for _ in range(3) for m in (nn.Conv2d(c, c, 1, bias=False), ctx.norm2d(c), nn.ReLU(inplace=True))]
        return nn.Sequential(*([Permute(0, 3, 1, 2)] if last else []), nn.AdaptiveAvgPool2d(first), *convs,
                             nn.AdaptiveAvgPool2d(second), nn.Flatten(),
                             *_mlp(f, norm1d_like(ctx.norm2d)), nn.Linear(f, classes))
    if len(shape) == 2:
        t, d = shape
        linears = [m for _ in range(3) for m in (nn.Linear(d, d, bias=False), nn.LayerNorm(d), nn.ReLU(inplace=True))]
        return nn.Sequential(TokenPool(math.ceil(t / 16)), *linears, TokenMean(),
                             *_mlp(d, norm1d_like(ctx.norm2d)), nn.Linear(d, classes))
    if len(shape) == 1:
        return nn.Sequential(*_mlp(shape[0], norm1d_like(ctx.norm2d)), nn.Linear(shape[0], classes))
    raise AugLocalError(f"the dgl rule has no aux head for activations of shape {shape}; use rule='auglocal'")


def _mlp(f: int, norm: Callable[[int], nn.Module]) -> list[nn.Module]:
    return [m for _ in range(2) for m in (nn.Linear(f, f, bias=False), norm(f), nn.ReLU(inplace=True))]


def norm1d_like(norm2d: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    """The (N, F) counterpart of the model's 2-d norm: BatchNorm1d for batch norm (the reference),
    the same GroupNorm for GroupNorm (it takes (N, F) as is), LayerNorm otherwise."""
    def make(f: int) -> nn.Module:
        m = norm2d(f)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return nn.BatchNorm1d(f)
        return m if isinstance(m, nn.GroupNorm) else nn.LayerNorm(f)
    return make


register_rule(Rule("dgl", "the DGL baseline: pooled 1x1 convs, a 2x2 pool and a 3-layer MLP; cross-entropy",
                   build_aux))
