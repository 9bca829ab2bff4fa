"""Pass 2c — layers: group the traced graph into the layers the paper counts, plus the head.

A *layer* is a run of the graph between two cut points. Which runs form a layer comes from
timm's ``group_matcher(coarse=False)`` when the model has one (stem, each block), else from the
module tree: each module reached by descending through containers (``Sequential``,
``ModuleList``, ``ModuleDict``) is a group (which module paths form a group, from the module tree
alone: ``module_groups.py``). A group that still holds a run of repeated blocks (a
stage: a container with two or more children of one composite class) is refined into those
blocks, whatever the matcher said; what the stage runs outside them (a downsample, a
transition) joins the nearest block before it (the first block for what comes first). Groups
whose boundary is not a valid cut are merged, and the reason is kept as a note; groups without
parameters, or with only normalisation parameters, join the group before them. The head is what
follows the last layer (pooling, norm, classifier); layers on flat vectors after the last layer on
a feature map or tokens (a classifier MLP) belong to it. A repeated container with no repeated
blocks inside (a ``Sequential(LayerNorm, Linear, GELU, Linear)`` block) is one group.
``find_layers(patterns=...)`` replaces all of this with the user's module-path globs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from ..errors import AugLocalError
from .cuts import is_tensor
from .module_groups import check_patterns, group_key_fn, pattern_key_fn, repeated_blocks, repeated_children

__all__ = ["LayerSpan", "find_layers", "node_params"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass
class LayerSpan:
    """One layer: the graph nodes it runs and the cut node whose value leaves it."""

    name: str
    nodes: list[fx.Node]
    boundary: fx.Node  # the node the layer's cut follows; for the head: the graph's output node


def _module_paths(n: fx.Node) -> list[str]:
    """Module paths that produced ``n``, shallowest first."""
    paths = [p for p in n.meta.get("nn_module_stack", {}) if p]
    if n.op in ("call_module", "get_attr") and n.target not in paths:
        paths.append(str(n.target))
    return paths


def node_params(gm: fx.GraphModule, n: fx.Node) -> list[nn.Parameter]:
    """Parameters a node reads directly: a called module's, or the one a ``get_attr`` fetches."""
    if n.op == "call_module":
        return list(gm.get_submodule(n.target).parameters())
    if n.op == "get_attr":
        t = operator.attrgetter(n.target)(gm)
        return [t] if isinstance(t, nn.Parameter) else []
    return []


# operators whose parameter operand is a layer's weight, not a scale or an embedding added on
_WEIGHTED_OPS = frozenset({"linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "einsum", "embedding", "convolution",
                           "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})


def _read_params(gm: fx.GraphModule, n: fx.Node) -> list[nn.Parameter]:
    """Parameters ``n`` uses as a layer: a called module's, and the weights a matrix product or a
    convolution reads through ``get_attr`` (``F.linear(x, self.weight)``; the weights of a module
    export inlines, GPT-2's Conv1D). A parameter an elementwise op reads (a layer scale, a position
    embedding) makes no layer of its own, as with fx's leaf modules."""
    own = node_params(gm, n)
    op = getattr(getattr(n.target, "overloadpacket", n.target), "__name__", "") if n.op == "call_function" else ""
    if op not in _WEIGHTED_OPS:
        return own
    return own + [p for a in n.all_input_nodes if a.op == "get_attr" for p in node_params(gm, a)]


def _norm_only(gm: fx.GraphModule, nodes: list[fx.Node]) -> bool:
    mods = [gm.get_submodule(n.target) for n in nodes if n.op == "call_module" and node_params(gm, n)]
    has_other_params = any(_read_params(gm, n) for n in nodes if n.op != "call_module")
    return bool(mods) and not has_other_params and all(isinstance(m, _NORMS) for m in mods)


def _flat(gm: fx.GraphModule, nodes: list[fx.Node]) -> bool:
    """Every parameterised op of ``nodes`` reads a flat vector per sample (shape (N, D))."""
    weighted = [n for n in nodes if node_params(gm, n) or any(node_params(gm, a) for a in n.all_input_nodes)]
    shapes = [a.meta.get("shape") for n in weighted for a in n.all_input_nodes[:1]]
    return bool(shapes) and all(s is not None and len(s) <= 2 for s in shapes)


def _deepest_path(n: fx.Node) -> str:
    paths = _module_paths(n)
    return max(paths, key=lambda p: p.count(".")) if paths else ""


def _refine(modules: dict[str, nn.Module], group: list,
            single: Callable[[fx.Node], bool] | None = None) -> list[list]:
    """Split one group (``[first pos, last pos, names, nodes]``) into the repeated blocks it runs,
    if it runs two or more; else return it as is. ``modules``: the model's ``named_modules()``;
    ``single(node)``: a cut after ``node`` hands on one tensor (nested blocks are split only there)."""
    nodes = group[3]
    paths = [path.split(".") if (path := _deepest_path(n)) else [] for n in nodes]
    touched: dict[tuple[int, str], set[str]] = {}  # (depth, module path) -> its children the group runs
    for parts in paths:
        for d in range(len(parts)):
            touched.setdefault((d, ".".join(parts[:d])), set()).add(parts[d])
    best = None  # the shallowest container of which the group runs two or more repeated blocks
    for d, prefix in sorted(touched, key=lambda k: k[0]):
        blocks = set(repeated_children(modules.get(prefix)))  # the root is modules[""]
        if len(touched[d, prefix] & blocks) >= 2:
            best = (d, prefix)
            break
    if best is None:
        return [group]
    d, prefix = best
    prefix_parts = prefix.split(".") if d else []
    subs: dict[str, list] = {}
    prefix_nodes = []  # what the stage runs before its first block (a downsample, a global branch)
    current = None
    for n, parts in zip(nodes, paths):
        if parts[:d] == prefix_parts and len(parts) > d and parts[d] in blocks:
            current = parts[d]
            if current not in subs:
                subs[current] = [f"{prefix}.{current}" if prefix else current, []]
        if current is None:
            prefix_nodes.append(n)
        else:
            subs[current][1].append(n)
    out = []
    for name, ns in subs.values():  # a block that holds repeated blocks itself (a stage of a stage list:
        # Hugging Face's ResNetStage.layers) is refined into those where nothing but one tensor passes
        # between them; a residual block's inner blocks (its input rides past them) stay one block
        sub = [None, None, [name], ns]
        inner = _refine(modules, sub, single) if single is not None and repeated_blocks(modules[name]) >= 2 else []
        out.extend(inner if len(inner) > 1 and all(single(g[3][-1]) for g in inner[:-1]) else [sub])
    if prefix_nodes:  # its own repeated blocks become layers too (gcvit's global branch), else it joins the first
        before = _refine(modules, [None, None, group[2], prefix_nodes], single)
        if len(before) > 1:
            return before + out
        out[0][3] = prefix_nodes + out[0][3]
    return out


def find_layers(
    gm: fx.GraphModule, model: nn.Module, act: set[fx.Node], cuts: list[fx.Node],
    live: dict[fx.Node, tuple[fx.Node, ...]] | None = None, patterns: Sequence[str] | None = None,
) -> tuple[list[LayerSpan], LayerSpan, list[str]]:
    """Split the activation nodes of ``gm`` into layers and a head. Needs node meta from tracing.

    ``live`` (``cuts.live_sets``) says what each cut hands on: where several cuts are possible
    between two layers, the one handing on the fewest tensors (then the latest) is taken. Returns
    ``(layers, head, notes)``; a note says why two groups had to be merged (no cut between them).
    ``patterns`` (module-path globs) name the layers instead of the automatic rules: each module
    whose path matches is one layer, what follows the last is the head, and a boundary without a
    valid cut is an error rather than a merge.
    """
    named = patterns is not None
    if named:
        key_of, from_timm = pattern_key_fn(check_patterns(model, patterns)), False
    else:
        key_of, from_timm = group_key_fn(model)
    order = [n for n in gm.graph.nodes if n in act and n.op != "placeholder"]
    pos = {n: i for i, n in enumerate(order)}
    cut_set = set(cuts)
    size = (lambda n: len(live[n])) if live is not None else (lambda n: 1)
    notes: list[str] = []

    def node_key(n: fx.Node):
        for p in _module_paths(n):
            k = key_of(p)
            if k is not None:
                return k, p
        for a in n.all_input_nodes:  # root-level op on a layer's parameter (ViT pos_embed add)
            if a.op == "get_attr" and a not in act:
                k = key_of(str(a.target))
                if k is not None:
                    return k, str(a.target)
        return None, None

    # 1. groups in graph order: (key, run) -> [first pos, last pos, names, nodes]. A key that comes
    #    back after another key's nodes starts a new run: timm's matchers file some modules under a
    #    far-away group ('^norm' also matches a ViT's norm_pre, which then spans every block).
    groups: dict[Hashable, list] = {}
    runs_of: dict[Hashable, int] = {}
    last = None
    for n in order:
        k, path = node_key(n)
        if k is None:
            continue
        if k != last:
            runs_of[k] = runs_of.get(k, -1) + 1
            last = k
        g = groups.setdefault((k, runs_of[k]), [pos[n], pos[n], [], []])
        g[1] = pos[n]
        g[3].append(n)
        if path not in g[2]:
            g[2].append(path)
    runs, modules = [], dict(model.named_modules())

    def single(n: fx.Node) -> bool:
        return live is not None and n in live and sum(map(is_tensor, live[n])) == 1

    for g in sorted(groups.values(), key=lambda g: g[0]):  # 1b. stages become their blocks
        for sub in ([g] if named else _refine(modules, g, single)):
            if sub[0] is None:
                sub[0], sub[1] = pos[sub[3][0]], max(pos[n] for n in sub[3])
            runs.append(sub)
    runs.sort(key=lambda g: g[0])

    def params_of(g):
        return [p for n in g[3] for p in _read_params(gm, n)]

    # 2. without timm, the classifier is the last group with parameters, plus parameter-free
    #    groups just before it (pooling, flatten): untag them so they fall to the head.
    if not from_timm and not named:
        tail = len(runs)
        while tail > 1 and not params_of(runs[tail - 1]):
            tail -= 1
        if tail > 1:
            tail -= 1
            while tail > 1 and not params_of(runs[tail - 1]):
                tail -= 1
            runs = runs[:tail]

    def merge(a, b):
        return [a[0], max(a[1], b[1]), a[2] + [p for p in b[2] if p not in a[2]], a[3] + b[3]]

    # 3. interleaved groups (a later group's node runs between an earlier group's) become one.
    merged: list[list] = []
    for g in runs:
        if merged and g[0] <= merged[-1][1]:
            if named:
                raise AugLocalError.bad_value("layers", list(patterns), f"names layers {merged[-1][2][-1]} and "
                                              f"{g[2][0]} whose computations interleave; name coarser layers")
            merged[-1] = merge(merged[-1], g)
        elif merged and not named and (not params_of(g) or _norm_only(gm, g[3])):
            merged[-1] = merge(merged[-1], g)  # activation / norm / pooling join the layer before
        else:
            merged.append(g)
    if merged and len(merged) > 1 and not named and not params_of(merged[0]):
        merged[1] = merge(merged[0], merged[1])
        merged.pop(0)
    # 3b. layers on flat vectors after the last one on a feature map or tokens are the classifier's
    #     hidden layers (VGG's, AlexNet's, MobileNetV3's): they join the head
    while len(merged) > 1 and not named and _flat(gm, merged[-1][3]) and not all(_flat(gm, g[3]) for g in merged):
        merged.pop()
    if not merged:
        raise AugLocalError(
            f"found no layers in {type(model).__name__}: no module with parameters before the head; "
            "pass a model with at least one layer before its classifier")

    # 4. each boundary is the cut before the next layer starts that hands on the fewest tensors
    #    (the latest of those); none -> merge, and say why.
    layers: list[list] = [merged[0]]
    boundaries: list[fx.Node] = []
    for g in merged[1:]:
        prev = layers[-1]
        gap = [order[i] for i in range(g[0] - 1, prev[1] - 1, -1)]
        options = [n for n in gap if n in cut_set]
        if not options and named:
            raise AugLocalError.bad_value("layers", list(patterns), f"names a layer boundary without a valid cut: "
                                          f"{_no_cut_note(prev, g, gap, live)}; name coarser layers")
        if not options:
            notes.append(_no_cut_note(prev, g, gap, live))
            layers[-1] = merge(prev, g)
        else:
            boundaries.append(min(options, key=size))  # min keeps the first (latest) of equals
            layers.append(g)
    last_end = layers[-1][1]
    tail = [order[i] for i in range(last_end, len(order)) if order[i] in cut_set]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    boundaries.append(min(tail, key=size) if tail else order[-1])

    spans, start = [], 0
    for g, b in zip(layers, boundaries):
        end = pos[b] + 1
        paths = g[2]
        name = paths[0] if len(paths) == 1 else f"{paths[0]}..{paths[-1]}"
        spans.append(LayerSpan(name, order[start:end], b))
        start = end
    head = LayerSpan("head", order[start:], output)
    return spans, head, notes


def _no_cut_note(prev: list, nxt: list, gap: list[fx.Node], live) -> str:
    """Why ``prev`` and ``nxt`` could not be cut apart: the fewest tensors live between them."""
    where = nxt[2][0]
    if live is None or not gap:
        return f"no cut before {where}: the two layers' nodes interleave"
    fewest = min((live[n] for n in gap), key=len)
    names = ", ".join(t.name for t in fewest[:6]) + (", ..." if len(fewest) > 6 else "")
    tensors = sum(map(is_tensor, fewest))
    others = len(fewest) - tensors  # values a cut cannot hand on: tuples, sizes computed from the batch
    what = f"{tensors} tensor{'s' if tensors != 1 else ''}" + (f" and {others} other value{'s' if others > 1 else ''}" if others else "")
    return f"{what} live across {where}: {names}"
