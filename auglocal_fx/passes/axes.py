"""Pass 2d — axes: which axis of every activation is the batch, which the channels, which spatial.

Measured, not guessed: the graph runs (on fake tensors: nothing is computed) at the planned input and
at a second one, batch 2 instead of 1 and twice as large along the input's spatial / sequence axes.
An axis that doubles with the batch is the batch; axes that follow the input's size are spatial or
sequence axes; the one axis that stays fixed is the channels. The tensor's layout follows
(``layouts.layout_for``): a 1-d conv net's maps (N, C, T) are ``"ncl"`` whatever reads them, a
channel shuffle's reshape does not make a map channels-last, a ViT's tokens are ``"ntc"``.

Where the measurement cannot tell (the model runs at one size only, e.g. a fixed position table; a
map pooled to a fixed grid, whose axes all stay fixed), the graph decides (``layouts.read_layout``);
where both tell, they must agree, and ``Axes.disagreements`` lists where they do not (the zoo
check counts them). A tensor neither can tell is ``UNKNOWN``: an adapter asked to act on it is an
error naming it, never a guess.

Which input axes are varied: every per-sample axis after the first of a floating-point input (the
channels of an image, a waveform or a clip come first, as PyTorch's convs take them), every axis of
an integer one (token ids have no channels). A model with several inputs has each varied so: token
ids and their attention mask grow together, an image and its pixel mask too.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .layouts import SEQUENCE, UNKNOWN, VECTOR, channel_axis, layout_for, read_layout
from .profiler import fake_state

__all__ = ["Axes", "measure_axes", "second_example", "varied_axes"]

SECOND_BATCH = 2  # the first run has batch 1
SCALE = 2  # the second input's spatial / sequence axes, times the first's


@dataclass
class Axes:
    """Per node: its layout (``"nchw"``, ``"ntc"``, ... or ``UNKNOWN``) and how it was found."""

    layouts: dict[str, str] = field(default_factory=dict)  # node name -> layout
    how: dict[str, str] = field(default_factory=dict)  # node name -> "measured" | "graph" | why unknown
    disagreements: list[str] = field(default_factory=list)  # one line each: measured vs graph
    second_run: str = ""  # why the second input could not run ("" when it ran)

    def of(self, node: fx.Node) -> str:
        return self.layouts.get(node.name, UNKNOWN)


def varied_axes(example: torch.Tensor) -> list[int]:
    """Per-sample axes of the model's input that the second run scales (see the module's docstring)."""
    rank = example.dim() - 1
    if example.is_floating_point() or example.is_complex():
        return list(range(1, rank))
    return list(range(rank))


def second_example(example: torch.Tensor) -> torch.Tensor:
    """The second input: batch ``SECOND_BATCH``, ``SCALE`` times as large along ``varied_axes``."""
    shape = [SECOND_BATCH, *example.shape[1:]]
    for a in varied_axes(example):
        shape[a + 1] *= SCALE
    return torch.zeros(shape, dtype=example.dtype, device=example.device)


class _ShapesOnly(ShapeProp):
    """ShapeProp that writes each node's shape to ``meta["shape2"]`` and leaves the rest alone."""

    def run_node(self, n: fx.Node):
        saved = n.meta.get("tensor_meta")
        out = super().run_node(n)
        meta = n.meta.get("tensor_meta")
        n.meta["shape2"] = tuple(meta.shape) if isinstance(meta, TensorMetadata) else None
        if saved is not None:
            n.meta["tensor_meta"] = saved
        else:
            n.meta.pop("tensor_meta", None)
        return out


def _second_run(gm: fx.GraphModule, examples: tuple[torch.Tensor, ...]) -> str:
    """Propagate shapes at ``second_example`` of each input; returns "" or why it could not run."""
    for n in gm.graph.nodes:
        n.meta.pop("shape2", None)
    held = io.StringIO()  # ShapeProp prints a traceback before re-raising: a failure here is expected
    prop = _ShapesOnly(gm)  # built outside the fake mode: inside, ShapeProp deep-copies gm into it
    try:
        with (FakeTensorMode(allow_non_fake_inputs=True) as mode, fake_state(gm, mode),
              contextlib.redirect_stderr(held), torch.no_grad()):
            prop.run(*(mode.from_tensor(second_example(x)) for x in examples))
    except Exception as exc:  # any op may refuse another size (a fixed position table, an assert)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return ""


def _measured(a: tuple, b: tuple | None) -> str | None:
    """The layout two shapes (batch 1 and ``SECOND_BATCH``) imply, or None when they cannot tell."""
    if b is None or len(a) != len(b) or len(a) < 2 or b[0] != SECOND_BATCH * a[0]:
        return None
    fixed = [i for i in range(1, len(a)) if a[i] == b[i]]
    if len(fixed) == 1:
        return layout_for(len(a), fixed[0])
    if not fixed:
        return layout_for(len(a), None)
    return None  # several fixed axes (a map pooled to a fixed grid, tokens of a fixed count)


def measure_axes(gm: fx.GraphModule, example: torch.Tensor | tuple[torch.Tensor, ...], nodes=None) -> Axes:
    """The layout of every tensor node in ``nodes`` (default: all) of a profiled ``gm``
    (``profiler.profile_graph`` wrote ``meta["shape"]`` at ``example``: the input, or a tuple of
    the model's inputs, each scaled alike by ``second_example``)."""
    axes = Axes(second_run=_second_run(gm, example if isinstance(example, tuple) else (example,)))
    for n in (gm.graph.nodes if nodes is None else nodes):
        a = n.meta.get("shape")
        if a is None or len(a) == 0:
            continue
        measured = _measured(a, n.meta.get("shape2"))
        graph = read_layout(gm, n)
        if measured == SEQUENCE and axes.second_run:
            measured = None  # a flattened map the second run stopped after: the graph decides
        if measured is not None and measured != UNKNOWN:
            axes.layouts[n.name], axes.how[n.name] = measured, "measured"
            if graph != UNKNOWN and graph != measured and len(a) > 2:
                axes.disagreements.append(f"{n.name}: measured {measured}, the graph reads {graph}")
            continue
        fixed_ok = _fixed_axes_allow(a, n.meta.get("shape2"), graph)
        if graph != UNKNOWN and fixed_ok:
            axes.layouts[n.name], axes.how[n.name] = graph, "graph"
        else:
            axes.layouts[n.name] = UNKNOWN
            axes.how[n.name] = "neither its shapes at two input sizes nor the ops around it tell its channel axis"
    return axes


def _fixed_axes_allow(a: tuple, b: tuple | None, graph: str) -> bool:
    """Whether the graph's reading puts the channels on an axis that the second run kept fixed
    (always, when there is no second run to go by)."""
    c = channel_axis(graph)
    if b is None or len(a) != len(b) or c is None or graph == VECTOR:  # a flattened map is features
        return True
    return a[c + 1] == b[c + 1]
