"""Pass 5 — emit: the model's graph cut into the plan's blocks, layers and head.

fx specialises Python control flow at trace time (``if self.training:``, drop-path rates), so the
model is traced twice, in train and in eval mode, and each piece keeps both graphs: it runs the
one matching its own mode. When both traces generate the same code one graph serves both.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .errors import AugLocalError
from .pipeline import set_mode
from .plan import Plan
from .split import split_graph
from .trace import trace

__all__ = ["ModalGraph", "trace_both_modes", "emit_pieces"]


class ModalGraph(nn.Module):
    """A graph piece traced in train and in eval mode; ``forward`` runs the one for ``self.training``."""

    def __init__(self, train_graph: fx.GraphModule, eval_graph: fx.GraphModule):
        super().__init__()
        self.train_graph = train_graph
        # Most models trace the same code in both modes: then keep a single graph.
        self.eval_graph = None if eval_graph.code == train_graph.code else eval_graph

    def forward(self, x):
        if self.training or self.eval_graph is None:
            return self.train_graph(x)
        return self.eval_graph(x)


def trace_both_modes(model: nn.Module) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(train-mode trace, eval-mode trace) of ``model``; both share its parameters."""
    with set_mode(model, True):
        train_gm = trace(model)
    with set_mode(model, False):
        eval_gm = trace(model)
    return train_gm, eval_gm


def _split_both(graphs, boundaries: list[str]) -> list[ModalGraph]:
    train_gm, eval_gm = graphs
    try:
        train_pieces = split_graph(train_gm, boundaries)
    except AugLocalError as exc:
        raise AugLocalError(f"the train-mode graph cannot be cut where the eval-mode plan says ({exc}); "
                            "the model's forward differs between train and eval too much") from None
    eval_pieces = split_graph(eval_gm, boundaries)
    return [ModalGraph(t, e) for t, e in zip(train_pieces, eval_pieces)]


def emit_pieces(model: nn.Module, plan: Plan, graphs=None):
    """Cut ``model`` as ``plan`` says.

    Returns ``(blocks, head, layers, layer_head)``: one ModalGraph per block and for the head
    (the rewritten model), and one per layer plus a head (templates the aux nets copy).
    """
    graphs = graphs or trace_both_modes(model)
    layer_cuts = [layer.boundary for layer in plan.layers]
    block_cuts = [plan.layers[b.layers[-1]].boundary for b in plan.blocks]
    *blocks, head = _split_both(graphs, block_cuts)
    *layers, layer_head = _split_both(graphs, layer_cuts)
    return blocks, head, layers, layer_head
