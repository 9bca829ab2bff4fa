"""The DGL baseline (Belilovsky et al. 2020) as the AugLocal reference code builds it
(``networks/auxiliary_nets.py``, ``AuxNetwork`` with ``net_config == 'DGL'``).

For a (C, H, W) map (and, ours, 1-d and 3-d maps alike): adaptive average pool to ceil(H/4) x ceil(W/4); three times a 1x1 conv
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

from ..assemble.adapters import CONV_ND, POOL_ND, TokenMean, TokenPool, norm_nd
from .rule import AuxContext, Rule, register_rule

__all__ = ["build_aux", "norm1d_like"]


def build_aux(ctx: AuxContext) -> nn.Module:
    v, classes = ctx.view("dgl"), ctx.num_classes
    if v.kind == "map":  # (C, *S), S of 1, 2 or 3 axes (the reference: 2)
        c, k = v.channels, len(v.spatial)
        first = tuple(math.ceil(s / 4) for s in v.spatial)
        second = tuple(min(s, 2) for s in first)
        f = c * math.prod(second)
        convs = [m for _ in range(3)
                 for m in (CONV_ND[k](c, c, 1, bias=False), norm_nd(ctx.norm2d, c, k), nn.ReLU(inplace=True))]
        return nn.Sequential(*([v.to_first] if v.to_first else []), POOL_ND[k](first), *convs, POOL_ND[k](second),
                             nn.Flatten(), *_mlp(f, norm1d_like(ctx.norm2d)), nn.Linear(f, classes))
    if v.kind == "tokens":
        t, d = v.spatial[0], v.channels
        linears = [m for _ in range(3) for m in (nn.Linear(d, d, bias=False), nn.LayerNorm(d), nn.ReLU(inplace=True))]
        return nn.Sequential(TokenPool(math.ceil(t / 16)), *linears, TokenMean(),
                             *_mlp(d, norm1d_like(ctx.norm2d)), nn.Linear(d, classes))
    return nn.Sequential(*_mlp(v.channels, norm1d_like(ctx.norm2d)), nn.Linear(v.channels, classes))


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
