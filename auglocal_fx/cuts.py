"""Pass 2b — cuts: which nodes carry activations, and where the graph can be cut.

A cut point is a position where exactly one activation tensor is live: the graph can be split
there with one tensor passing between the two halves. Everything that does not depend on the
input (parameter reads and arithmetic on them) is a constant any block can recompute.
"""

from __future__ import annotations

import torch.fx as fx

from .errors import AugLocalError

__all__ = ["activation_nodes", "cut_points"]


def activation_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the first input (the image / token batch).

    Everything else — parameters, buffers, specialised side inputs and arithmetic on them —
    is a constant that any block can recompute, so it never pins a value across a cut.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise AugLocalError("the traced graph has no input; forward must take a tensor")
    act = {placeholders[0]}
    for n in graph.nodes:
        if n not in act and any(a in act for a in n.all_input_nodes):
            act.add(n)
    return act


def cut_points(graph: fx.Graph, act: set[fx.Node] | None = None) -> list[fx.Node]:
    """Activation nodes T such that, right after T (or after constant nodes that follow it),
    T is the only live activation and it is a tensor (``shape`` in its meta, from the profile).
    Returned in graph order; includes the input."""
    act = activation_nodes(graph) if act is None else act
    order = list(graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in order}
    live: set[fx.Node] = set()
    dying: dict[int, list[fx.Node]] = {}
    cuts = []
    for i, n in enumerate(order):
        if n.op == "output":
            break
        if n in act and last_use[n] > i:
            live.add(n)
            dying.setdefault(last_use[n], []).append(n)
        for d in dying.pop(i, []):
            live.discard(d)
        if len(live) == 1:
            (t,) = live
            if t.meta.get("shape") is not None and (not cuts or cuts[-1] is not t):
                cuts.append(t)
    return cuts
