"""Widen a copied layer to the tensor its aux net hands it, instead of adapting the tensor first.

Where an aux net skips a layer that widens the channels and strides the resolution, the copy of the
next selected layer would see another shape than in the backbone. The plain fix (``adapters.py``)
puts a 1x1 conv + norm in front of an unchanged copy, so the copy's own convolutions run at the
width the backbone gave them. The reference's aux nets do it differently: they build the copied
block from the current width, its first convolution strided from the input's channels, and a 1x1
conv shortcut. ``widen`` does that on any copied graph piece: every convolution that reads the
piece's input directly is rebuilt to take the input's channels at the adapter's stride (same output
channels, kernel, padding, groups of one), and only the input's other readers (an identity
shortcut, a pooling branch) go through the adapter. Where the piece reads its input only through
convolutions (a stage's first block, with a conv shortcut) no adapter is left at all.

Cheaper by construction: a rebuilt convolution reads C' < C channels where the copy read C (and the
adapter's own conv is gone from the main path); ResNet-32's aux nets do the reference's arithmetic.

Only a single-tensor input with a 1x1-conv adapter (a channels-first map, stride s on every axis)
is widened; anything else keeps the adapter in front. The widened piece's output shape is checked
against the adapted copy's (fake tensors), else the adapter stays in front.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..modes import eval_mode
from ..passes.profiler import fake_state
from ..runtime.bundles import Chain
from .adapters import CONV_ND, Adapter
from .emit import DualModeGraph

__all__ = ["ADAPTER_MODES", "WidenedCopy", "entry_conv", "widen"]

ADAPTER_MODES = ("widen", "front")  # PlanConfig.adapters


class WidenedCopy(DualModeGraph):
    """A copied layer whose first convolutions take the aux net's tensor as it comes: ``summary``
    for plan tables (``widen/2->64x8x8``, or ``widen/2+1x1->...`` where the adapter stays on
    the input's other paths), ``in_shape`` (per sample) for FLOPs, ``layer`` the copied layer's index."""

    summary: str = ""
    in_shape: list[int] | None = None


def widen(adapter: nn.Module, piece: nn.Module) -> WidenedCopy | None:
    """What ``Chain(adapter, piece)`` computes with ``piece``'s input convolutions widened (module
    docstring), or None where that cannot be done (``adapter`` is not a strided 1x1 conv + norm on
    a single tensor, ``piece`` reads its input through no plain convolution). ``piece`` is a copy
    the aux net owns: the widened copy shares its other modules."""
    conv = _pointwise_conv(adapter)
    if conv is None or not isinstance(piece, DualModeGraph):
        return None
    graphs = [piece.train_graph] + ([piece.eval_graph] if piece.eval_graph is not None else [])
    readers = [_conv_readers(g) for g in graphs]
    if not readers[0] or any(set(r) != set(readers[0]) for r in readers):
        return None
    wide = {t: _widened(piece.train_graph.get_submodule(t), conv) for t in readers[0]}
    if any(w is None for w in wide.values()):
        return None
    new = [_rewrite(g, wide, adapter) for g in graphs]
    out = WidenedCopy(new[0], new[-1] if len(new) > 1 else new[0])
    # "widen/2+1x1->64x8x8": widened at stride 2, the adapter kept on the other paths (the
    # layout goes unsaid: only channels-first maps are widened)
    kind, _, target = adapter.summary.split(" (")[0].partition("->")
    stride = kind.removeprefix("conv1x1")
    kept = "+1x1" if _adapter_node(new[0]) is not None else ""
    out.summary = f"widen{stride}{kept}->{target}"
    out.in_shape = adapter.in_shape
    if not _same_output(out, Chain(adapter, piece), adapter.in_shape):
        return None
    return out


def _pointwise_conv(adapter: nn.Module) -> nn.Module | None:
    """The adapter's 1x1 conv where it is exactly ``conv1x1/s`` + norm on a channels-first map."""
    if not isinstance(adapter, Adapter) or len(adapter) != 2 or adapter.in_shape is None:
        return None
    conv = adapter[0]
    if not isinstance(conv, tuple(CONV_ND.values())) or conv.groups != 1 or set(conv.kernel_size) != {1}:
        return None
    return conv


def entry_conv(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> nn.Module | None:
    """The convolution ``node`` calls if it is one a widened copy rebuilds: a plain ``nn.ConvNd`` of
    one group and zero padding, called on ``x`` alone (the planner measures the same readers)."""
    if node.op != "call_module" or node.args != (x,) or node.kwargs:
        return None
    m = gm.get_submodule(node.target)
    plain = type(m) in CONV_ND.values() and m.groups == 1 and m.padding_mode == "zeros"
    return m if plain and not isinstance(m.padding, str) else None  # padding="same" cannot be strided


def _conv_readers(gm: fx.GraphModule) -> list[str]:
    """Targets of the convolutions ``entry_conv`` accepts that read the graph's input."""
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return [u.target for u in x.users if entry_conv(gm, u, x) is not None]


def _widened(conv: nn.Module, adapter_conv: nn.Module) -> nn.Module | None:
    """``conv`` rebuilt to read the adapter's input: its in-channels, and its stride times the adapter's."""
    if conv.in_channels != adapter_conv.out_channels:
        return None
    stride = tuple(a * b for a, b in zip(conv.stride, adapter_conv.stride))
    new = type(conv)(adapter_conv.in_channels, conv.out_channels, conv.kernel_size, stride=stride,
                     padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None)
    return new.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _rewrite(gm: fx.GraphModule, wide: dict[str, nn.Module], adapter: nn.Module) -> fx.GraphModule:
    """A new GraphModule over ``gm``'s modules: widened convolutions in place of the input's conv
    readers, the adapter between the input and its other readers (none if it has none)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    x = next(n for n in graph.nodes if n.op == "placeholder")
    others = [u for u in list(x.users) if not (u.op == "call_module" and u.target in wide)]
    if others:
        with graph.inserting_after(x):
            adapted = graph.call_module("widen_adapter", (x,))
        for u in others:
            u.replace_input_with(x, adapted)
    # fx builds the new module's hierarchy from the targets (its own containers, these leaves)
    attrs = {n.target: wide.get(n.target) or operator.attrgetter(n.target)(gm)
             for n in graph.nodes if n.op in ("call_module", "get_attr") and n.target != "widen_adapter"}
    if others:
        attrs["widen_adapter"] = adapter
    return fx.GraphModule(attrs, graph, type(gm).__name__)


def _adapter_node(gm: fx.GraphModule) -> fx.Node | None:
    return next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == "widen_adapter"), None)


def _same_output(a: nn.Module, b: nn.Module, shape: list[int]) -> bool:
    """Whether ``a`` and ``b`` give outputs of the same shapes for one sample of ``shape`` (fake tensors)."""
    outs = []
    for m in (a, b):
        with eval_mode(m), FakeTensorMode(allow_non_fake_inputs=True) as fake, fake_state(m, fake):
            try:
                y = m(fake.from_tensor(torch.zeros(1, *shape)))
            except Exception:  # noqa: BLE001  (a model's own shape assert too): keep the adapter in front
                return False
        outs.append([tuple(t.shape) for t in (y if isinstance(y, tuple) else (y,)) if isinstance(t, torch.Tensor)])
    return outs[0] == outs[1]
