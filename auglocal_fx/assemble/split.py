"""Split a traced graph at cut points into a chain of GraphModules, each handing the next the
tensors that are live at its cut (one tensor, or a bundle: then a tuple, oldest first).

Unlike ``torch.fx.passes.split_module``, constant nodes (parameter reads and arithmetic on them)
are recomputed inside every piece that needs them instead of being passed along, and a tensor
used several pieces later (a U-Net skip) is handed through the pieces in between, so each piece
takes exactly the previous piece's outputs. Every piece shares submodules and parameters with
the traced module, and hence with the original model.
"""

from __future__ import annotations

import torch.fx as fx

from ..errors import AugLocalError
from ..passes.cuts import activation_nodes, input_nodes, live_sets

__all__ = ["split_graph"]


def split_graph(gm: fx.GraphModule, boundaries: list[str]) -> list[fx.GraphModule]:
    """Cut ``gm`` after each node named in ``boundaries`` (activation nodes, in graph order).

    Returns ``len(boundaries) + 1`` modules; chaining them (``piece(*outs)`` when a piece returns
    a tuple) reproduces ``gm`` exactly.

    Example:
        >>> a, b = split_graph(gm, ["layer1_0_act3"])
        >>> torch.equal(b(a(x)), gm(x))
        True
    """
    graph = gm.graph
    act = activation_nodes(graph)
    live = live_sets(graph, act)
    nodes = list(graph.nodes)
    by_name = {n.name: n for n in nodes}
    index = {n: i for i, n in enumerate(nodes)}
    missing = [b for b in boundaries if b not in by_name]
    if missing:
        raise AugLocalError(f"cut node(s) {', '.join(missing)} are not in the traced graph; "
                            "the model differs from the one the plan was made for: re-plan it")
    cuts = [by_name[b] for b in boundaries]
    if [index[c] for c in cuts] != sorted(set(index[c] for c in cuts)):
        raise AugLocalError("cut nodes are not in graph order; re-plan the model")
    not_act = [c.name for c in cuts if c not in live]
    if not_act:
        raise AugLocalError(f"cut node(s) {', '.join(not_act)} do not depend on the input; "
                            "a cut follows an activation")
    inputs = tuple(input_nodes(graph))  # the first piece takes the model's inputs
    side_inputs = [n for n in nodes if n.op == "placeholder" and n not in inputs]
    ends = [index[c] for c in cuts] + [len(nodes) - 1]
    pieces, start = [], 0
    for piece_no, (end, cut) in enumerate(zip(ends, cuts + [None])):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for t in inputs:
            env[t] = g.placeholder(t.name)
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
            outputs = live[cut]
            g.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[t] for t in outputs))
            inputs = outputs
        pieces.append(fx.GraphModule(gm, g, f"{type(gm).__name__}Piece{piece_no}"))
        start = end + 1
    return pieces


def _bring(n: fx.Node, g: fx.Graph, env: dict, act: set, piece_no: int) -> fx.Node:
    """Copy ``n`` into ``g`` if it is a constant (recomputed here); activations must already be there."""
    if n in env:
        return env[n]
    if n in act:  # cannot happen when every live tensor crosses; kept as a guard for future callers
        raise AugLocalError(f"node '{n.name}' is needed in piece {piece_no} but lives in an earlier one")
    for a in n.all_input_nodes:
        _bring(a, g, env, act, piece_no)
    env[n] = g.node_copy(n, env.__getitem__)
    return env[n]
