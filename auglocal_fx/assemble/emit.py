"""Pass 5 — emit: the model's graph cut into the plan's blocks, layers and head.

fx specialises Python control flow at trace time (``if self.training:``, drop-path rates), so the
model is traced twice, in train and in eval mode, and each piece keeps both graphs: it runs the
one matching its own mode. When both traces generate the same code one graph serves both.
torch has no module for this (``torch.export`` and fx both capture one mode), hence ``DualModeGraph``.

torchvision's ``feature_extraction.DualGraphModule`` does the same job, but is not reused: it swaps
``self.graph`` on every ``train()`` / ``eval()`` that changes the mode, and assigning a GraphModule's
graph regenerates and recompiles its Python code (every block, layer template and aux copy would
recompile at each switch between training and evaluation), its ``deepcopy`` (aux nets copy layers)
recompiles too, and it copies submodules out of a root into a new hierarchy where our pieces must
share the original model's modules and parameters.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from ..errors import AugLocalError
from ..modes import set_mode
from ..passes.frontend import trace_with
from ..plan import Plan
from .split import split_graph

__all__ = ["DualModeGraph", "trace_both_modes", "emit_pieces"]


class DualModeGraph(nn.Module):
    """A graph piece traced in train and in eval mode; ``forward`` runs the one for ``self.training``."""

    def __init__(self, train_graph: fx.GraphModule, eval_graph: fx.GraphModule):
        super().__init__()
        self.train_graph = train_graph
        # Most models trace the same code in both modes: then keep a single graph.
        self.eval_graph = None if eval_graph.code == train_graph.code else eval_graph

    def forward(self, *xs):
        if self.training or self.eval_graph is None:
            return self.train_graph(*xs)
        return self.eval_graph(*xs)

    def slot_use(self, slots: int) -> tuple[list[bool], list[set[int]]]:
        """For each of the first ``slots`` inputs (the bundle it takes): whether the piece computes
        with it, and which of its outputs it is handed to unchanged (a skip passing through)."""
        graph = self.train_graph.graph
        inputs = [n for n in graph.nodes if n.op == "placeholder"][:slots]
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        outs = output.args[0] if isinstance(output.args[0], tuple) else (output.args[0],)
        computes = [any(u is not output for u in p.users) for p in inputs]
        handed = [{k for k, o in enumerate(outs) if o is p} for p in inputs]
        return computes, handed

    def __deepcopy__(self, memo):
        """A copy with its own parameters that reuses the generated code (aux nets copy layers).

        ``copy.deepcopy`` of a GraphModule regenerates and recompiles its Python code, tens of
        milliseconds a piece; the graphs here are never mutated after emit, so the copies share
        graph and code and deep-copy only modules, parameters and buffers. One ``memo`` keeps the
        train and eval graphs of the copy sharing parameters, as in the original.
        """
        new = copy.copy(self)
        memo[id(self)] = new
        new._modules = {k: _clone_graph_module(m, memo) if isinstance(m, fx.GraphModule) else copy.deepcopy(m, memo)
                        for k, m in self._modules.items()}
        return new


def _clone_graph_module(gm: fx.GraphModule, memo: dict) -> fx.GraphModule:
    if id(gm) in memo:
        return memo[id(gm)]
    new = copy.copy(gm)  # same generated class (forward) and graph; new attribute dict
    memo[id(gm)] = new
    new._modules = {k: copy.deepcopy(m, memo) for k, m in gm._modules.items()}
    new._parameters = {k: copy.deepcopy(p, memo) for k, p in gm._parameters.items()}
    new._buffers = {k: copy.deepcopy(b, memo) for k, b in gm._buffers.items()}
    return new


def trace_both_modes(model: nn.Module, plan: Plan) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(train-mode trace, eval-mode trace) of ``model`` by the front end that traced it for ``plan``
    (export runs on zeros of the plan's input shapes and dtypes); both share its parameters."""
    c = plan.config
    examples = tuple(torch.zeros(1, *size, dtype=getattr(torch, dtype)) for size, dtype in c.input_specs())
    graphs = []
    for training in (True, False):
        with set_mode(model, training):
            graphs.append(trace_with(model, c.traced_with, examples, c.output)[0])
    return graphs[0], graphs[1]


def _split_both(graphs, boundaries: list[str]) -> list[DualModeGraph]:
    train_gm, eval_gm = graphs
    ops = [{n.name: (n.op, n.target) for n in gm.graph.nodes} for gm in graphs]
    for b in boundaries:  # one name, one operation: a name the modes number apart would cut elsewhere
        if b in ops[0] and b in ops[1] and ops[0][b] != ops[1][b]:
            raise AugLocalError(f"cut node {b!r} is {ops[0][b][1]} in the train-mode graph and {ops[1][b][1]} in the "
                                "eval-mode graph; the model's forward differs between train and eval too much to cut there")
    try:
        train_pieces = split_graph(train_gm, boundaries)
    except AugLocalError as exc:
        raise AugLocalError(f"the train-mode graph cannot be cut where the eval-mode plan says ({exc}); "
                            "the model's forward differs between train and eval too much") from exc
    eval_pieces = split_graph(eval_gm, boundaries)
    for i, (t, e) in enumerate(zip(train_pieces[:-1], eval_pieces[:-1])):  # the last returns the model's output
        if _arity(t) != _arity(e):
            raise AugLocalError(f"after boundary {i} the train-mode graph hands on {_arity(t)} tensors and the "
                                f"eval-mode graph {_arity(e)}; the model's forward differs between train and eval "
                                "too much to cut there")
    return [DualModeGraph(t, e) for t, e in zip(train_pieces, eval_pieces)]


def _arity(piece: fx.GraphModule) -> int:
    """How many tensors a piece hands on (a bundle is a tuple)."""
    out = next(n for n in reversed(piece.graph.nodes) if n.op == "output").args[0]
    return len(out) if isinstance(out, tuple) else 1


def emit_pieces(model: nn.Module, plan: Plan):
    """Cut ``model`` as ``plan`` says.

    Returns ``(blocks, head, layers, layer_head)``: one DualModeGraph per block and for the head
    (the rewritten model), and one per layer plus a head (templates the aux nets copy).
    """
    graphs = trace_both_modes(model, plan)
    layer_cuts = [layer.boundary for layer in plan.layers]
    block_cuts = [plan.layers[b.layers[-1]].boundary for b in plan.blocks]
    *blocks, head = _split_both(graphs, block_cuts)
    *layers, layer_head = _split_both(graphs, layer_cuts)
    return blocks, head, layers, layer_head
