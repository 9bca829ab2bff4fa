"""Pass 2b — cuts: which nodes carry activations, which of them are live at each point, and where
the graph can be cut.

A cut after node T hands on every activation tensor that is live there (computed before T, used
after T): usually one tensor, sometimes a small *bundle* — a class token beside the patch tokens,
a CSP partial branch, a DenseNet feature list, U-Net skips. A cut point is a node after which the
bundle holds at most ``max_live`` tensors, T itself among them (so T is the newest tensor of the
bundle). Sizes read off a tensor's shape (``B, C, H, W = x.shape``, as PiT and Swin write) may
cross a cut too, beside the tensors, without counting towards ``max_live``: they are plain ints;
so may a value that is None (naflexvit's attention mask for an image without padding). Everything that does not depend on the input (parameter reads and arithmetic on them) is
a constant any block can recompute, so it never crosses a cut.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..errors import AugLocalError

__all__ = ["MAX_BUNDLE", "MODEL_INPUT", "input_nodes", "activation_nodes", "live_sets", "cut_points", "shape_read", "is_tensor", "is_none"]

MAX_BUNDLE = 8  # the most tensors a cut may hand on (DenseNet's first dense layers, U-Net skips)
MODEL_INPUT = "model_input"  # placeholder meta key: this placeholder is one of the model's inputs (trace.py)


def input_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The placeholders of the model's inputs (``trace(inputs=...)``), in order; for a graph traced
    otherwise, its first placeholder. Placeholders after them are specialised defaults."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return [p for p in placeholders if p.meta.get(MODEL_INPUT)] or placeholders[:1]


def activation_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the model's inputs (the image / token batch, and any further
    input such as an attention mask: ``input_nodes``).

    Everything else — parameters, buffers, specialised side inputs and arithmetic on them —
    is a constant that any block can recompute, so it never pins a value across a cut.
    """
    act = set(input_nodes(graph))
    if not act:
        raise AugLocalError("the traced graph has no input; forward must take a tensor")
    for n in graph.nodes:
        if n not in act and any(a in act for a in n.all_input_nodes):
            act.add(n)
    return act


def live_sets(graph: fx.Graph, act: set[fx.Node] | None = None) -> dict[fx.Node, tuple[fx.Node, ...]]:
    """For every activation node T (the output node excluded): the activation nodes computed at or
    before T and used after it, oldest first — what a cut right after T must hand on."""
    act = activation_nodes(graph) if act is None else act
    order = list(graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in order}
    live: dict[fx.Node, None] = {}  # insertion-ordered: oldest first
    out = {}
    for i, n in enumerate(order):
        if n.op == "output":
            break
        if n in act and last_use[n] > i:
            live[n] = None
        for d in [d for d in live if last_use[d] <= i]:
            del live[d]
        if n in act:
            out[n] = tuple(live)
    return out


def is_tensor(n: fx.Node) -> bool:
    """The node's value is a tensor (``shape`` in its meta, from the profile)."""
    return n.meta.get("shape") is not None


_SIZE_ARITHMETIC = (operator.floordiv, operator.mul, operator.add, operator.sub, operator.mod)


def is_none(n: fx.Node) -> bool:
    """The node's value was None when profiled (an optional mask a model builds and does not use)."""
    return n.meta.get("type") is type(None)


def shape_read(n: fx.Node) -> str | None:
    """``"batch"`` for a read of a tensor's batch size (``x.shape[0]``, ``x.size(0)``), ``"static"``
    for a read of another dimension, or integer arithmetic on such reads only (``H // patch``:
    fixed for a given input size), None for anything else."""
    if n.meta.get("value") is None:
        return None
    if n.op == "call_function" and n.target in _SIZE_ARITHMETIC:  # H // patch, H * W: static if its reads are
        reads = n.all_input_nodes
        return "static" if reads and all(shape_read(a) == "static" for a in reads) else None
    if (n.op == "call_method" and n.target == "size" and len(n.args) == 2) or (
            n.op == "call_function" and n.target is torch.ops.aten.sym_size.int):  # fx's x.size(1); export's
        return "batch" if n.args[1] == 0 else "static"
    if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        src, index = n.args
        whole = ((src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
                 or (src.op == "call_method" and src.target == "size" and len(src.args) == 1))
        if whole and isinstance(index, int):
            return "batch" if index == 0 else "static"
    return None


def cut_points(graph: fx.Graph, act: set[fx.Node] | None = None, max_live: int = 1,
               live: dict[fx.Node, tuple[fx.Node, ...]] | None = None) -> list[fx.Node]:
    """Activation nodes T after which at most ``max_live`` tensors are live, T among them; anything
    else live must be a shape read (``shape_read``). In graph order; includes the input.
    ``max_live=1`` gives the single-tensor cuts."""
    live = live_sets(graph, act) if live is None else live
    out = []
    for t, bundle in live.items():
        tensors = [x for x in bundle if is_tensor(x)]
        if t in tensors and len(tensors) <= max_live and all(is_tensor(x) or shape_read(x) or is_none(x)
                                                                for x in bundle):
            out.append(t)
    return out
