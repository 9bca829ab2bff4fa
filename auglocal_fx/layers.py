"""Pass 2b — layers: group the traced graph into the layers the paper counts, plus the head.

A *layer* is a run of the graph between two cut points (one live tensor). Which runs form a
layer comes from timm's ``group_matcher(coarse=False)`` when the model has one (stem, each
block), else from the module tree: each module reached by descending through containers
(``Sequential``, ``ModuleList``, ``ModuleDict``) is a group. Groups whose boundary is not a
valid cut are merged; groups without parameters, or with only normalisation parameters, join
the group before them. The head is what follows the last layer (pooling, norm, classifier).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch.fx as fx
from timm.models._manipulate import group_with_matcher  # timm re-exports only group_modules/parameters
from torch import nn

from .errors import AugLocalError

__all__ = ["LayerSpan", "find_layers", "group_key_fn", "node_params"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_HEAD_SENTINEL = "\x00auglocal-head-sentinel"


@dataclass
class LayerSpan:
    """One layer: the graph nodes it runs and the cut node whose value leaves it."""

    name: str
    nodes: list[fx.Node]
    boundary: fx.Node  # for the head: the graph's output node


def _timm_key_fn(model: nn.Module) -> Callable[[str], Hashable | None] | None:
    matcher_fn = getattr(model, "group_matcher", None)
    if not callable(matcher_fn):
        return None
    try:
        matcher = matcher_fn(coarse=False)
    except (TypeError, NotImplementedError):  # a group_matcher of another signature: use the module tree
        return None
    names = [n for n, _ in model.named_modules() if n]
    names += [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    # timm puts every unmatched name (neck, head) in one last group; the sentinel finds it.
    ids = group_with_matcher(((n, n) for n in names + [_HEAD_SENTINEL]), matcher, reverse=True)
    head = ids[_HEAD_SENTINEL]
    return lambda path: None if ids.get(path, head) == head else ids[path]


def _tree_key_fn(model: nn.Module) -> Callable[[str], Hashable | None]:
    def key(path: str):
        mod, parts = model, path.split(".")
        for i, part in enumerate(parts):
            mod = getattr(mod, part, None)
            if mod is None:
                return None
            if not isinstance(mod, _CONTAINERS):
                return ".".join(parts[: i + 1])
        return None  # a container itself is not a group; its children are

    return key


def group_key_fn(model: nn.Module) -> tuple[Callable[[str], Hashable | None], bool]:
    """Map a module path to its group key (None = not in any layer). Second item: from timm."""
    fn = _timm_key_fn(model)
    return (fn, True) if fn is not None else (_tree_key_fn(model), False)


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


def _norm_only(gm: fx.GraphModule, nodes: list[fx.Node]) -> bool:
    mods = [gm.get_submodule(n.target) for n in nodes if n.op == "call_module" and node_params(gm, n)]
    has_other_params = any(node_params(gm, n) for n in nodes if n.op != "call_module")
    return bool(mods) and not has_other_params and all(isinstance(m, _NORMS) for m in mods)


def find_layers(
    gm: fx.GraphModule, model: nn.Module, act: set[fx.Node], cuts: list[fx.Node]
) -> tuple[list[LayerSpan], LayerSpan]:
    """Split the activation nodes of ``gm`` into layers and a head. Needs node meta from tracing."""
    key_of, from_timm = group_key_fn(model)
    order = [n for n in gm.graph.nodes if n in act and n.op != "placeholder"]
    pos = {n: i for i, n in enumerate(order)}
    cut_set = set(cuts)

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

    # 1. groups in graph order: key -> [first pos, last pos, names, nodes]
    groups: dict[Hashable, list] = {}
    for n in order:
        k, path = node_key(n)
        if k is None:
            continue
        g = groups.setdefault(k, [pos[n], pos[n], [], []])
        g[1] = pos[n]
        g[3].append(n)
        if path not in g[2]:
            g[2].append(path)
    runs = sorted(groups.values(), key=lambda g: g[0])

    def params_of(g):
        return [p for n in g[3] for p in node_params(gm, n)]

    # 2. without timm, the classifier is the last group with parameters, plus parameter-free
    #    groups just before it (pooling, flatten): untag them so they fall to the head.
    if not from_timm:
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
            merged[-1] = merge(merged[-1], g)
        elif merged and (not params_of(g) or _norm_only(gm, g[3])):
            merged[-1] = merge(merged[-1], g)  # activation / norm / pooling join the layer before
        else:
            merged.append(g)
    if merged and len(merged) > 1 and not params_of(merged[0]):
        merged[1] = merge(merged[0], merged[1])
        merged.pop(0)
    if not merged:
        raise AugLocalError(
            f"found no layers in {type(model).__name__}: no module with parameters before the head; "
            "pass a model with at least one layer before its classifier")

    # 4. each boundary is the latest valid cut before the next layer starts; none -> merge.
    layers: list[list] = [merged[0]]
    boundaries: list[fx.Node] = []
    for g in merged[1:]:
        prev = layers[-1]
        cut = next((order[i] for i in range(g[0] - 1, prev[1] - 1, -1) if order[i] in cut_set), None)
        if cut is None:
            layers[-1] = merge(prev, g)
        else:
            boundaries.append(cut)
            layers.append(g)
    last_end = layers[-1][1]
    head_cut = next((order[i] for i in range(last_end, len(order)) if order[i] in cut_set), None)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    boundaries.append(head_cut if head_cut is not None else order[-1])

    spans, start = [], 0
    for g, b in zip(layers, boundaries):
        end = pos[b] + 1
        paths = g[2]
        name = paths[0] if len(paths) == 1 else f"{paths[0]}..{paths[-1]}"
        spans.append(LayerSpan(name, order[start:end], b))
        start = end
    head = LayerSpan("head", order[start:], output)
    return spans, head
