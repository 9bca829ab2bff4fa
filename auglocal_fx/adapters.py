"""The smallest module that turns one activation shape into another, for aux nets that skip layers.

Rule (per sample shapes, batch dimension excluded):
- equal shapes: nothing;
- (C, H, W) -> (C', H', W') with H/H' = W/W' = s a positive integer: 1x1 conv, stride s (+ norm);
- other (C, H, W) pairs (channels first, as timm's CNNs): 1x1 conv (+ norm) then adaptive average pooling to (H', W');
- tokens (T, D) -> (T, D'): a linear map on D; (T, D) -> (T', D'): linear on D, then adaptive
  average pooling over tokens;
- vectors (D,) -> (D',): linear;
- (C, H, W) -> (T, D): one token per position, linear on channels, pooling over tokens;
  (T, D) -> (C, H, W): linear, pooling to H*W tokens, laid out as a map;
- (C, H, W) or (T, D) -> (D',): global average pooling, then linear;
- bundles (several tensors handed on at once): per tensor, see ``make_bundle_adapter``.

A channels-last map (N, H, W, C) (``layouts.layout_of``: Swin, torchvision's ``swin_t``) is moved to
channels-first, adapted as above, and moved back where the target is channels-last too, so convs,
norms and linears act on the channel axis, never on image rows.

"norm" is the model's own kind of 2-d normalisation (``norm2d_like``), as in its downsample
shortcuts: a GroupNorm model's aux nets stay free of batch statistics (so data-parallel training
matches one process), a BatchNorm model's get BatchNorm.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from timm.layers import LayerNorm2d
from torch import nn

from .errors import AugLocalError
from .layouts import CHANNELS_LAST
from .plan import is_size_kind

__all__ = ["Adapter", "BatchSize", "BundleAdapter", "Constant", "MapToTokens", "Permute", "TokenMean",
           "TokensToMap", "bundle_sources", "make_adapter", "make_bundle_adapter", "TokenPool", "norm2d_like"]


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


class Permute(nn.Module):
    """``x.permute(*dims)``: between channels-last (N, H, W, C) and channels-first (N, C, H, W) maps."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return ", ".join(map(str, self.dims))


def _channels_first(shape: list[int], layout: str) -> tuple[list[int], bool]:
    if layout == CHANNELS_LAST and len(shape) == 3:
        return [shape[2], shape[0], shape[1]], True
    return list(shape), False


def make_adapter(src: list[int], dst: list[int], norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 layouts: tuple[str, str] = ("", "")) -> Adapter | None:
    """An adapter from activations of per-sample shape ``src`` to ``dst``, or None if equal.

    ``layouts`` (``layouts.layout_of`` of source and target) say where a 3-d shape is channels-last
    (H, W, C): the adapter then works on the channels-first view and permutes in and out."""
    (csrc, src_last), (cdst, dst_last) = _channels_first(src, layouts[0]), _channels_first(dst, layouts[1])
    adapter = _make_adapter(csrc, cdst, norm)
    if (src_last or dst_last) and (adapter is not None or src_last != dst_last):
        mods = ([Permute(0, 3, 1, 2)] if src_last else []) + list(adapter or []) + \
               ([Permute(0, 2, 3, 1)] if dst_last else [])
        summary = f"{adapter.summary.split('->')[0] if adapter is not None else 'permute'}->{'x'.join(map(str, dst))} (channels last)"
        adapter = Adapter(summary, *mods)
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
        return Adapter("+".join(["linear"] * (d != d2) + ["pool"] * (t != t2)) + label, *mods)
    if len(src) == 1 and len(dst) == 1:
        return Adapter(f"linear{label}", nn.Linear(src[0], dst[0]))
    if len(src) == 3 and len(dst) == 2:  # feature map -> tokens: one token per position
        (c, h, w), (t, d) = src, dst
        mods = [MapToTokens()] + ([nn.Linear(c, d)] if c != d else []) + ([TokenPool(t)] if h * w != t else [])
        return Adapter(f"tokens{'+linear' if c != d else ''}{'+pool' if h * w != t else ''}{label}", *mods)
    if len(src) == 2 and len(dst) == 3:  # tokens -> feature map: pooled to one token per position
        (t, d), (c, h, w) = src, dst
        mods = ([nn.Linear(d, c)] if c != d else []) + ([TokenPool(h * w)] if t != h * w else [])
        return Adapter(f"{'linear+' if c != d else ''}{'pool+' if t != h * w else ''}map{label}",
                       *mods, TokensToMap(h, w))
    if len(dst) == 1 and len(src) in (2, 3):  # a feature map or tokens -> a vector: pool, then project
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if len(src) == 3 else TokenMean()
        width = src[0] if len(src) == 3 else src[1]
        return Adapter(f"pool+linear{label}", pool, nn.Linear(width, dst[0]))
    raise AugLocalError(
        f"no shape adapter from {src} to {dst}: the aux net skips layers that change the tensor "
        "layout; use --aux-depth large enough to copy every later layer, or --rule dgl")


class MapToTokens(nn.Module):
    """(N, C, H, W) -> (N, H*W, C): one token per position."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class TokensToMap(nn.Module):
    """(N, H*W, C) -> (N, C, H, W)."""

    def __init__(self, h: int, w: int):
        super().__init__()
        self.h, self.w = h, w

    def forward(self, x):
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.h, self.w)


class TokenMean(nn.Module):
    """(N, T, D) -> (N, D): the mean over tokens."""

    def forward(self, x):
        return x.mean(dim=1)


class BundleAdapter(nn.Module):
    """Adapts a bundle to another: output i is ``adapters[i]`` applied to input ``sources[i]``
    (an ``nn.Identity`` where the shapes already agree), plus, for output ``host``, every
    ``extras`` adapter applied to its input: source tensors no output is made from still reach
    the aux net's loss, so the block that made them trains."""

    def __init__(self, adapters: list[nn.Module], sources: list[int], host: int = 0,
                 extras: dict[int, nn.Module] | None = None):
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.sources = list(sources)
        self.host = host
        self.extra_sources = list(extras or {})
        self.extras = nn.ModuleList((extras or {}).values())

    def forward(self, *xs):
        out = [a(xs[s]) for a, s in zip(self.adapters, self.sources)]
        for s, a in zip(self.extra_sources, self.extras):
            out[self.host] = out[self.host] + a(xs[s])
        return out[0] if len(out) == 1 else tuple(out)


class BatchSize(nn.Module):
    """The batch size of a tensor, for a bundle slot that holds one (``B, C, H, W = x.shape``)."""

    def forward(self, x):
        return x.shape[0]


class Constant(nn.Module):
    """A fixed size (an H or W read off a shape at the converted input size), or None, for a slot."""

    def __init__(self, value: int | None):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


def bundle_sources(src: list[list[int]], dst: list[list[int]], src_kinds: list[str], dst_kinds: list[str],
                   needed: list[bool] | None = None) -> tuple[list[int], list[int], int]:
    """How a bundle adapter reads its input: ``(sources, extras, host)``.

    A target is fed by a source of exactly its shape and kind if there is one (slot i first), else
    by slot i when both bundles hold as many slots of the same kinds (tensor or size) and slot i has
    the target's rank, else by the largest source tensor (the newest of equals). Any other
    floating-point source tensor that no ``needed`` target is made from is an *extra*: it is
    adapted to the ``host`` target (the largest needed floating-point one) and added to it, so
    every tensor a block hands on reaches the aux net's loss. Kinds are ``LayerInfo.crossing_dtypes``.
    """
    needed = needed or [True] * len(dst)
    pairwise = len(src_kinds) == len(dst_kinds) and all(is_size_kind(a) == is_size_kind(b) for a, b in zip(src_kinds, dst_kinds))
    tensors = [i for i, k in enumerate(src_kinds) if not is_size_kind(k)]
    largest = max(tensors, key=lambda i: (math.prod(src[i]), i))
    sources = []
    for i, (shape, kind) in enumerate(zip(dst, dst_kinds)):
        same = [j for j in range(len(src)) if src[j] == shape and src_kinds[j] == kind]
        if pairwise and i in same:
            sources.append(i)
        elif same:  # the very tensor (a position table every block takes) sits in another slot
            sources.append(same[-1])
        elif pairwise and not is_size_kind(kind) and len(src[i]) == len(shape):
            sources.append(i)
        else:
            sources.append(largest)
    floats = [i for i, k in enumerate(dst_kinds) if needed[i] and _is_float(k)]
    if not floats:
        return sources, [], 0
    host = max(floats, key=lambda i: (math.prod(dst[i]), i))
    used = {sources[i] for i in range(len(dst_kinds)) if needed[i]}
    extras = [i for i, k in enumerate(src_kinds) if _is_float(k) and i not in used]
    return sources, extras, host


def make_bundle_adapter(src: list[list[int]], dst: list[list[int]], norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
                        src_dtypes: list[str] | None = None, dst_dtypes: list[str] | None = None,
                        needed: list[bool] | None = None, src_layouts: list[str] | None = None,
                        dst_layouts: list[str] | None = None) -> nn.Module | None:
    """The adapter from a bundle of per-sample shapes ``src`` to ``dst`` (oldest first), or None.

    Target i is made from source ``bundle_sources(...)[0][i]`` by the smallest ``make_adapter``;
    extra sources are added to the host target (``bundle_sources``). A single tensor on both
    sides gets a plain ``Adapter``. A target nobody downstream reads (``needed[i]`` false: a skip
    the aux net drops) is the source tensor as is, with no weights that would never train.
    Tensors that are not floating point (masks, indices) pass through unchanged and must already
    have the target's shape. A size slot gets the batch size of its source tensor, or the fixed
    value the target had at the converted input size. ``src_layouts`` / ``dst_layouts``: per slot,
    whether a map is channels-last (``make_adapter``).
    """
    src_dtypes = src_dtypes or ["float32"] * len(src)
    dst_dtypes = dst_dtypes or ["float32"] * len(dst)
    src_layouts = src_layouts or [""] * len(src)
    dst_layouts = dst_layouts or [""] * len(dst)
    if len(src) == 1 and len(dst) == 1:
        return make_adapter(src[0], dst[0], norm, (src_layouts[0], dst_layouts[0]))
    needed = needed or [True] * len(dst)
    sources, extras, host = bundle_sources(src, dst, src_dtypes, dst_dtypes, needed)
    if src == dst and src_dtypes == dst_dtypes and src_layouts == dst_layouts and not extras:
        return None
    adapters: list[nn.Module] = []
    for i, s in enumerate(sources):
        want, have = dst_dtypes[i], src_dtypes[s]
        if not needed[i] or (want == have and src[s] == dst[i] and src_layouts[s] == dst_layouts[i]):
            adapters.append(nn.Identity())
        elif is_size_kind(want):
            adapters.append(BatchSize() if want == "batch" else
                            Constant(None if want == "none" else int(want.removeprefix("int="))))
        elif not _is_float(want) or not _is_float(have):
            raise AugLocalError(f"no shape adapter from a {have} tensor {src[s]} to a {want} tensor {dst[i]} "
                                "in a bundle; use an aux_depth large enough to copy every later layer, or rule='dgl'")
        else:
            adapters.append(make_adapter(src[s], dst[i], norm, (src_layouts[s], dst_layouts[i])) or nn.Identity())
    extra = {s: make_adapter(src[s], dst[host], norm, (src_layouts[s], dst_layouts[host])) or nn.Identity()
             for s in extras}
    return BundleAdapter(adapters, sources, host, extra)


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "half"))
