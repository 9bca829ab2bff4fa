"""The smallest module that turns one activation shape into another, for aux nets that skip layers.

Every tensor has a measured layout (``axes.py``, ``layouts.py``): which axis holds the channels and
which are spatial or sequence axes. Adapters act on the channel axis with a learned weight and on
the others only by pooling or striding, never by position. Rule (per sample shapes, batch excluded):
- equal shapes: nothing;
- maps with k spatial axes, (C, *S) -> (C', *S'), k = 1, 2, 3 (``"ncl"``, ``"nchw"``, ``"ncdhw"``):
  a 1x1 conv (Conv1d / Conv2d / Conv3d) + norm, with stride s where S/S' = s on every axis, else
  followed by adaptive average pooling to S'; between maps of different ranks, the spatial axes
  flattened, a Conv1d 1x1 + norm, pooling to prod(S') positions, unflattened to S';
- tokens (T, D) -> (T, D') (``"ntc"``): a linear map on D; (T, D) -> (T', D'): linear on D, then
  adaptive average pooling over tokens;
- vectors (D,) -> (D',) (``"nc"``): linear;
- a map -> tokens: one token per position, linear on channels, pooling over tokens;
  tokens -> a map: linear, pooling to as many tokens as positions, laid out as a map;
- a map or tokens -> a vector: global average pooling, then linear;
- bundles (several tensors handed on at once): per tensor, see ``make_bundle_adapter``.

A channels-last map (``"nhwc"``: Swin, torchvision's ``swin_t``, ``"ndhwc"``) is moved to
channels-first, adapted as above, and moved back where the target is channels-last too. A tensor
whose layout is ``UNKNOWN`` gets no adapter but a one-line error. ``axis_audit.py`` checks every
adapter by running it: no spatial or sequence axis may be contracted by a weight.

"norm" is the model's own kind of normalisation (``norm2d_like``), as in its downsample
shortcuts: a GroupNorm model's aux nets stay free of batch statistics (so data-parallel training
matches one process), a BatchNorm model's get BatchNorm (1-d, 2-d or 3-d as the map).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from timm.layers import LayerNorm2d
from torch import nn

from ..errors import AugLocalError
from ..passes.layouts import channels_first, has_channels, is_channels_last, kind_of, resolve_layout
from ..plan import is_size_kind

__all__ = ["Adapter", "BatchSize", "BundleAdapter", "Constant", "MapToTokens", "Permute", "TokenMean",
           "TokensToMap", "SpatialMean", "CONV_ND", "POOL_ND", "norm_nd", "bundle_sources", "make_adapter", "make_bundle_adapter", "TokenPool", "norm2d_like"]


class Adapter(nn.Sequential):
    """A shape adapter; ``summary`` is a short label for plan tables, e.g. ``conv1x1/2->512x28x28``."""

    def __init__(self, summary: str, *mods: nn.Module, in_shape: list[int] | None = None):
        super().__init__(*mods)
        self.summary = summary
        self.in_shape = in_shape  # per sample, for FLOP counts
        self.in_layout = ""  # the layout of its input (layouts.py), for the axis audit


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


def norm_nd(norm: Callable[[int], nn.Module], c: int, k: int) -> nn.Module:
    """The model's kind of norm for a map with ``k`` spatial axes: ``norm`` itself for 2-d maps; for
    1-d and 3-d ones batch norm of that rank, or the same GroupNorm (it takes any rank)."""
    m = norm(c)
    if k == 2 or isinstance(m, nn.GroupNorm):
        return m
    return (nn.BatchNorm1d if k == 1 else nn.BatchNorm3d)(c)


# a 1x1 conv and adaptive average pooling for maps of 1, 2 and 3 spatial axes
CONV_ND = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
POOL_ND = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def _canonical(shape: list[int], layout: str) -> list[int]:
    """A channels-last map's shape with the channels moved first; others as they are."""
    if is_channels_last(layout):
        return [shape[-1], *shape[:-1]]
    return list(shape)


def _check_layout(shape: list[int], layout: str, what: str) -> str:
    layout = resolve_layout(shape, layout)
    if not has_channels(shape, layout):
        raise AugLocalError(
            f"cannot tell which axis of the {what} tensor of shape {shape} holds the channels, so no adapter "
            f"can be built for it; name the layers with layers=[...] so that no aux net skips past it, "
            f"or write the plan (auglocal-convert --out plan.yaml), set that tensor's crossing_layouts "
            f"entry (e.g. 'ncl', 'nchw', 'nhwc', 'ntc') and convert with plan=")
    return layout


def make_adapter(src: list[int], dst: list[int], norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 layouts: tuple[str, str] = ("", "")) -> Adapter | None:
    """An adapter from activations of per-sample shape ``src`` to ``dst``, or None if equal.

    ``layouts`` are the two tensors' layouts (``layouts.py``: ``"nchw"``, ``"ncl"``, ``"nhwc"``,
    ``"ntc"``, ...; "" is what plans written before layouts were measured assumed by rank). The
    summary names the source's layout, e.g. ``conv1x1/2->32x250 (ncl)``."""
    if src == dst and resolve_layout(src, layouts[0]) == resolve_layout(dst, layouts[1]):
        return None
    ls, ld = _check_layout(src, layouts[0], "source"), _check_layout(dst, layouts[1], "target")
    if src == dst and ls == ld:
        return None
    src_last, dst_last = is_channels_last(ls), is_channels_last(ld)
    cs, cd = channels_first(ls), channels_first(ld)
    adapter = _make_adapter(_canonical(src, ls), _canonical(dst, ld), cs, cd, norm)
    mods = list(adapter or [])
    if src_last:
        mods.insert(0, Permute(0, len(src), *range(1, len(src))))
    if dst_last:
        mods.append(Permute(0, *range(2, len(dst) + 1), 1))
    if not mods:
        return None
    kind = adapter.summary if adapter is not None else "permute"
    adapter = Adapter(f"{kind}->{'x'.join(map(str, dst))} ({ls})", *mods)
    adapter.in_shape, adapter.in_layout = list(src), ls
    return adapter


def _make_adapter(src: list[int], dst: list[int], ls: str, ld: str, norm: Callable[[int], nn.Module]) -> Adapter | None:
    """The adapter between channels-first shapes of layouts ``ls`` and ``ld`` (no channels-last
    map here). Its summary is the kind of adapter alone, e.g. ``conv1x1/2``."""
    if src == dst and ls == ld:
        return None
    ks, kd = kind_of(ls), kind_of(ld)
    if ks == kd == "map" and len(src) == len(dst):
        (c, *sp), (c2, *sp2) = src, dst
        k = len(sp)
        ratios = {a // b if b and a % b == 0 else 0 for a, b in zip(sp, sp2)}
        if len(ratios) == 1 and 0 not in ratios:
            s = ratios.pop()
            return Adapter(f"conv1x1/{s}", CONV_ND[k](c, c2, 1, stride=s, bias=False), norm_nd(norm, c2, k))
        return Adapter("conv1x1+pool", CONV_ND[k](c, c2, 1, bias=False), norm_nd(norm, c2, k), POOL_ND[k](tuple(sp2)))
    if ks == kd == "map":  # maps of another rank: the spatial axes flattened, a 1-d map's adapter
        (c, *sp), (c2, *sp2) = src, dst  # (EfficientViM's (C, H*W) state beside its (C, H, W) maps)
        n, n2 = math.prod(sp), math.prod(sp2)
        mods = ([nn.Flatten(2)] if len(sp) > 1 else []) + [nn.Conv1d(c, c2, 1, bias=False), norm_nd(norm, c2, 1)]
        mods += ([nn.AdaptiveAvgPool1d(n2)] if n != n2 else []) + ([nn.Unflatten(2, tuple(sp2))] if len(sp2) > 1 else [])
        return Adapter(f"flatten+conv1x1{'+pool' if n != n2 else ''}", *mods)
    if ks == kd == "tokens":
        (t, d), (t2, d2) = src, dst
        mods = [nn.Linear(d, d2)] if d != d2 else []
        if t != t2:
            mods.append(TokenPool(t2))
        return Adapter("+".join(["linear"] * (d != d2) + ["pool"] * (t != t2)), *mods)
    if ks == kd == "vector":
        return Adapter("linear", nn.Linear(src[0], dst[0]))
    if ks == "map" and kd == "tokens":  # one token per position
        (c, *sp), (t, d) = src, dst
        n = math.prod(sp)
        mods = [MapToTokens()] + ([nn.Linear(c, d)] if c != d else []) + ([TokenPool(t)] if n != t else [])
        return Adapter(f"tokens{'+linear' if c != d else ''}{'+pool' if n != t else ''}", *mods)
    if ks == "tokens" and kd == "map":  # pooled to one token per position
        (t, d), (c, *sp) = src, dst
        n = math.prod(sp)
        # pooled even where T == prod(S) (adaptive pooling to T is then the identity): the adapter
        # takes any number of tokens, as the backbone may
        mods = ([nn.Linear(d, c)] if c != d else []) + [TokenPool(n)]
        return Adapter(f"{'linear+' if c != d else ''}{'pool+' if t != n else ''}map", *mods, TokensToMap(*sp))
    if kd == "vector" and ks in ("map", "tokens"):  # pool, then project
        pool = TokenMean() if ks == "tokens" else SpatialMean(tuple(range(2, len(src) + 1)))
        return Adapter("pool+linear", pool, nn.Linear(src[-1] if ks == "tokens" else src[0], dst[0]))
    raise AugLocalError(
        f"no shape adapter from {src} ({ls}) to {dst} ({ld}): the aux net skips layers that change the tensor "
        "layout; use --aux-depth large enough to copy every later layer, or --rule dgl")


class SpatialMean(nn.Module):
    """The mean over ``dims`` (a map's spatial axes): (N, C, *S) -> (N, C)."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x):
        return x.mean(dim=self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class MapToTokens(nn.Module):
    """(N, C, H, W) -> (N, H*W, C): one token per position."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class TokensToMap(nn.Module):
    """(N, prod(S), C) -> (N, C, *S): tokens laid out as a map of spatial size S (1, 2 or 3 axes)."""

    def __init__(self, *size: int):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x):
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.size)


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
