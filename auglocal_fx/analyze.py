"""Pass 2a — analyze: run the traced graph once and record, per node, what the plan needs.

Per node: output shape, FLOPs (``torch.utils.flop_counter``) and the storages autograd saves
for backward (``saved_tensors_hooks``), which is what a block's activation memory really is.
Parameters and buffers autograd saves (a conv's weight) are left out: they are resident whatever
the partition, so counting them would charge a block for its weights twice.
Per graph: which nodes carry activations (depend on the input) and where the valid cut points
are — positions where exactly one activation tensor is live.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from .errors import AugLocalError

__all__ = ["profile_graph", "activation_nodes", "cut_points"]


class _Profiler(fx.Interpreter):
    """Interpreter that stores ``shape``, ``flops`` and ``saved`` in each node's meta."""

    current: fx.Node  # the node being run, named in errors

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.resident = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers())}

    def run_node(self, n: fx.Node):
        saved: dict[int, int] = {}

        def pack(t):
            try:
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.resident:
                    saved[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # sparse / wrapper tensors have no storage
                pass
            return t

        counter = FlopCounterMode(display=False)
        self.current = n
        with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = super().run_node(n)
        n.meta["shape"] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        n.meta["flops"] = int(counter.get_total_flops())
        n.meta["saved"] = saved
        return out


def profile_graph(gm: fx.GraphModule, example: torch.Tensor):
    """Run ``gm`` on ``example`` with gradients enabled, annotating every node's meta.

    Returns the output. The module's train/eval mode is left as the caller set it; call
    it in eval mode so that batch-norm statistics are not updated.
    """
    profiler = _Profiler(gm)
    profiler.current = next(iter(gm.graph.nodes))
    try:
        with torch.enable_grad():
            return profiler.run(example)
    except Exception as exc:  # fx appends its own lines to the message; the user needs the node
        n = profiler.current
        what = n.target if n.op == "call_module" else getattr(n.target, "__name__", n.target)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AugLocalError(f"running node '{n.name}' ({n.op} {what}) on input {tuple(example.shape[1:])} "
                            f"failed: {type(exc).__name__}: {first[:300]}; check --input-size") from None


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
    T is the only live activation and it is a tensor: the graph can be split there with one
    tensor passing between the two halves. Returned in graph order; includes the input."""
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
