"""Split a traced graph at cut points into a chain of GraphModules, one tensor passing between each.

Unlike ``torch.fx.passes.split_module``, constant nodes (parameter reads and arithmetic on them)
are recomputed inside every piece that needs them instead of being passed along, so a piece's
only input is the previous piece's output. Every piece shares submodules and parameters with
the traced module, and hence with the original model.
"""

from __future__ import annotations

import torch.fx as fx

from .cuts import activation_nodes
from .errors import AugLocalError

__all__ = ["split_graph"]


def split_graph(gm: fx.GraphModule, boundaries: list[str]) -> list[fx.GraphModule]:
    """Cut ``gm`` after each node named in ``boundaries`` (in graph order, each a cut point).

    Returns ``len(boundaries) + 1`` modules; chaining them reproduces ``gm`` exactly.

    Example:
        >>> a, b = split_graph(gm, ["layer1_0_act3"])
        >>> torch.equal(b(a(x)), gm(x))
        True
    """
    graph = gm.graph
    act = activation_nodes(graph)
    nodes = list(graph.nodes)
    by_name = {n.name: n for n in nodes}
    index = {n: i for i, n in enumerate(nodes)}
    missing = [b for b in boundaries if b not in by_name]
    if missing:
        raise AugLocalError(f"cut node(s) {', '.join(missing)} are not in the traced graph; "
                            "the model differs from the one the plan was made for: re-plan it")
    cuts = [by_name[b] for b in boundaries]
    if [index[c] for c in cuts] != sorted(index[c] for c in cuts):
        raise AugLocalError("cut nodes are not in graph order; re-plan the model")
    placeholders = [n for n in nodes if n.op == "placeholder"]
    side_inputs = placeholders[1:]
    ends = [index[c] for c in cuts] + [len(nodes) - 1]
    pieces, start, prev_cut = [], 0, None
    for piece_no, (end, cut) in enumerate(zip(ends, cuts + [None])):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if prev_cut is None:
            env[placeholders[0]] = g.placeholder(placeholders[0].name)
        else:
            env[prev_cut] = g.placeholder(prev_cut.name)
        for p in side_inputs:  # specialised defaults: every piece accepts them, none needs them
            env[p] = g.node_copy(p, env.__getitem__)

        def bring(n: fx.Node, g=g, env=env, piece_no=piece_no) -> fx.Node:
            return _bring(n, g, env, act, piece_no)

        for n in nodes[start: end + 1]:
            if n.op == "placeholder" or n in env:
                continue
            if n.op == "output":
                g.output(fx.map_arg(n.args[0], bring), type_expr=n.type)
                continue
            if n in act or not n.users:  # constants are brought in by their users
                for a in n.all_input_nodes:
                    bring(a)
                env[n] = g.node_copy(n, env.__getitem__)
        if cut is not None:
            g.output(env[cut])
        pieces.append(fx.GraphModule(gm, g, f"{type(gm).__name__}Piece{piece_no}"))
        start, prev_cut = end + 1, cut
    return pieces


def _bring(n: fx.Node, g: fx.Graph, env: dict, act: set, piece_no: int) -> fx.Node:
    """Copy ``n`` into ``g`` if it is a constant (recomputed here); activations must already be there."""
    if n in env:
        return env[n]
    if n in act:
        raise AugLocalError(
            f"node '{n.name}' is needed in piece {piece_no} but lives in an earlier one: "
            "the requested boundary is not a valid cut")
    for a in n.all_input_nodes:
        _bring(a, g, env, act, piece_no)
    env[n] = g.node_copy(n, env.__getitem__)
    return env[n]
