"""The smallest module that turns one activation shape into another, for aux nets that skip layers.

Rule (per sample shapes, batch dimension excluded):
- equal shapes: nothing;
- (C, H, W) -> (C', H', W') with H/H' = W/W' = s a positive integer: 1x1 conv, stride s (+ norm);
- other (C, H, W) pairs (channels first, as timm's CNNs): 1x1 conv (+ norm) then adaptive average pooling to (H', W');
- tokens (T, D) -> (T, D'): a linear map on D; (T, D) -> (T', D'): linear on D, then adaptive
  average pooling over tokens;
- vectors (D,) -> (D',): linear;
- bundles (several tensors handed on at once): per tensor, see ``make_bundle_adapter``.

"norm" is the model's own kind of 2-d normalisation (``norm2d_like``), as in its downsample
shortcuts: a GroupNorm model's aux nets stay free of batch statistics (so data-parallel training
matches one process), a BatchNorm model's get BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable

from timm.layers import LayerNorm2d
from torch import nn

from .errors import AugLocalError

__all__ = ["Adapter", "BundleAdapter", "bundle_sources", "make_adapter", "make_bundle_adapter", "TokenPool",
           "norm2d_like"]


class Adapter(nn.Sequential):
    """A shape adapter; ``summary`` is a short label for plan tables, e.g. ``conv1x1/2->512x28x28``."""

    def __init__(self, summary: str, *mods: nn.Module, in_shape: list[int] | None = None):
        super().__init__(*mods)
        self.summary = summary
        self.in_shape = in_shape  # per sample, for FLOP counts


class TokenPool(nn.Module):
    """Adaptive average pooling over the token axis of an (N, T, D) tensor."""

    def __init__(self, tokens: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool1d(tokens)

    def forward(self, x):
        return self.pool(x.transpose(1, 2)).transpose(1, 2)


def norm2d_like(model: nn.Module) -> Callable[[int], nn.Module]:
    """``channels -> norm module`` of the kind ``model`` normalises feature maps with.

    The first GroupNorm or timm LayerNorm2d found (before any BatchNorm) decides; anything else,
    and models without 2-d norms, get BatchNorm2d.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            break
        if isinstance(m, nn.GroupNorm):
            groups, eps = m.num_groups, m.eps
            return lambda c: nn.GroupNorm(groups if c % groups == 0 else 1, c, eps=eps)
        if isinstance(m, LayerNorm2d):
            eps = m.eps
            return lambda c: LayerNorm2d(c, eps=eps)
    return nn.BatchNorm2d


def make_adapter(src: list[int], dst: list[int], norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> Adapter | None:
    """An adapter from activations of per-sample shape ``src`` to ``dst``, or None if equal."""
    adapter = _make_adapter(list(src), list(dst), norm)
    if adapter is not None:
        adapter.in_shape = list(src)
    return adapter


def _make_adapter(src: list[int], dst: list[int], norm: Callable[[int], nn.Module]) -> Adapter | None:
    if src == dst:
        return None
    label = f"->{'x'.join(map(str, dst))}"
    if len(src) == 3 and len(dst) == 3:
        (c, h, w), (c2, h2, w2) = src, dst
        if h % h2 == 0 and w % w2 == 0 and h // h2 == w // w2:
            s = h // h2
            return Adapter(f"conv1x1/{s}{label}", nn.Conv2d(c, c2, 1, stride=s, bias=False), norm(c2))
        return Adapter(f"conv1x1+pool{label}", nn.Conv2d(c, c2, 1, bias=False), norm(c2),
                       nn.AdaptiveAvgPool2d((h2, w2)))
    if len(src) == 2 and len(dst) == 2:
        (t, d), (t2, d2) = src, dst
        mods = [nn.Linear(d, d2)] if d != d2 else []
        if t != t2:
            mods.append(TokenPool(t2))
        return Adapter(f"{'linear' if d != d2 else ''}{'+pool' if t != t2 else ''}{label}", *mods)
    if len(src) == 1 and len(dst) == 1:
        return Adapter(f"linear{label}", nn.Linear(src[0], dst[0]))
    raise AugLocalError(
        f"no shape adapter from {src} to {dst}: the aux net skips layers that change the tensor "
        "layout; use --aux-depth large enough to copy every later layer, or --rule dgl")



class BundleAdapter(nn.Module):
    """Adapts a bundle to another: output tensor i is ``adapters[i]`` applied to input tensor
    ``sources[i]`` (an ``nn.Identity`` where the shapes already agree)."""

    def __init__(self, adapters: list[nn.Module], sources: list[int]):
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.sources = list(sources)

    def forward(self, *xs):
        out = tuple(a(xs[s]) for a, s in zip(self.adapters, self.sources))
        return out[0] if len(out) == 1 else out


def bundle_sources(src_len: int, dst_len: int) -> list[int]:
    """Which source tensor feeds each target tensor: tensor i feeds tensor i when both bundles hold
    as many; else every target is made from the newest source (what a plain network hands on)."""
    return list(range(dst_len)) if src_len == dst_len else [src_len - 1] * dst_len


def make_bundle_adapter(src: list[list[int]], dst: list[list[int]], norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
                        src_dtypes: list[str] | None = None, dst_dtypes: list[str] | None = None,
                        needed: list[bool] | None = None) -> nn.Module | None:
    """The adapter from a bundle of per-sample shapes ``src`` to ``dst`` (oldest first), or None.

    Target i is made from source ``bundle_sources(...)[i]`` by the smallest ``make_adapter``. A
    single tensor on both sides gets a plain ``Adapter``. A target nobody downstream reads
    (``needed[i]`` false: a skip the aux net drops) is the source tensor as is, with no weights
    that would never train. Tensors that are not floating point (masks, indices) pass through
    unchanged and must already have the target's shape.
    """
    if len(src) == 1 and len(dst) == 1:
        return make_adapter(src[0], dst[0], norm)
    if src == dst:
        return None
    sources = bundle_sources(len(src), len(dst))
    src_dtypes = src_dtypes or ["float32"] * len(src)
    dst_dtypes = dst_dtypes or ["float32"] * len(dst)
    needed = needed or [True] * len(dst)
    adapters: list[nn.Module] = []
    for i, s in enumerate(sources):
        if not needed[i]:
            adapters.append(nn.Identity())
            continue
        if not _is_float(dst_dtypes[i]) or not _is_float(src_dtypes[s]):
            if src[s] != dst[i] or src_dtypes[s] != dst_dtypes[i]:
                raise AugLocalError(f"no shape adapter from a {src_dtypes[s]} tensor {src[s]} to a {dst_dtypes[i]} "
                                    f"tensor {dst[i]} in a bundle; use an aux_depth large enough to copy every "
                                    "later layer, or rule='dgl'")
            adapters.append(nn.Identity())
            continue
        adapters.append(make_adapter(src[s], dst[i], norm) or nn.Identity())
    return BundleAdapter(adapters, sources)


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "half"))
