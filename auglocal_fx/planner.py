"""The planner: trace → profile → cuts → layers → partition → selection, joined into one ``Plan``.

Each step is a pass module of its own; this module only runs them in order, checks the user's
planning arguments, and turns the traced graph into the plain figures the plan carries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .assemble.light_head import HEAVY_HEAD_SHARE, LIGHT_WIDTH
from .assemble.widen import entry_conv
from .aux_costs import aux_extra, aux_figures, light_head_info
from .costs import slot_bytes, unit_cost
from .errors import AugLocalError
from .fingerprint import plan_fingerprint
from .models import default_input_size, registered_name
from .modes import eval_mode
from .options import resolve
from .passes.axes import Axes, measure_axes
from .passes.cuts import (
    MAX_BUNDLE,
    activation_nodes,
    cut_points,
    input_nodes,
    is_none,
    is_tensor,
    live_sets,
    shape_read,
)
from .passes.frontend import trace_with
from .passes.layers import LayerSpan, find_layers, node_params
from .passes.layouts import has_channels, resolve_layout
from .passes.module_groups import repeated_blocks
from .passes.partition import get_balance
from .passes.profiler import profile_graph
from .passes.selection import apply_tail, pyramid_depths, select_layers
from .plan import (
    AuxRecipe,
    BlockInfo,
    LayerInfo,
    Plan,
    PlanConfig,
    available_memory,
    check_input_size,
)
from .rules import Rule, get_rule

__all__ = ["Analysis", "analyze_model", "available_memory", "build_plan", "check_input_size"]


@dataclass
class Analysis:
    """A traced, profiled graph and its layers. Node meta holds shape / flops / saved bytes."""

    gm: fx.GraphModule
    act: set[fx.Node]
    cuts: list[fx.Node]  # nodes after which at most max_bundle tensors are live (cuts.cut_points)
    live: dict[fx.Node, tuple[fx.Node, ...]]  # what a cut after each activation node hands on
    layers: list[LayerSpan]
    head: LayerSpan
    input_size: tuple[int, ...]
    notes: list[str] = dataclasses.field(default_factory=list)  # why groups were merged (no cut)
    max_bundle: int = MAX_BUNDLE
    output: str | int | None = None  # which of the model's outputs the graph returns (trace.select_output)
    output_notes: list[str] = dataclasses.field(default_factory=list)  # which output was picked by default
    axes: Axes = dataclasses.field(default_factory=Axes)  # every crossing tensor's measured layout (axes.py)
    input_dtype: str = "float32"  # what the model takes: float images, int64 token ids, ...
    extra_inputs: list[dict] = dataclasses.field(default_factory=list)  # PlanConfig.extra_inputs
    traced_with: str = "fx"  # the front end that traced it (passes/frontend.py)

    @property
    def widest_cut(self) -> int:
        """The most tensors one layer boundary hands on (sizes riding along not counted)."""
        return max(sum(map(is_tensor, self.live.get(span.boundary, ()))) for span in self.layers)


def analyze_model(model: nn.Module, input_size=None, max_bundle: int = MAX_BUNDLE, layers=None,
                  output: str | int | None = None, example_inputs=None, frontend: str = "auto") -> Analysis:
    """Trace ``model`` (in eval mode), profile one sample, find cut points, layers and the layout
    of every tensor a cut hands on (``axes.py``).

    A cut may hand on up to ``max_bundle`` tensors (1: single-tensor cuts only). ``layers``
    (module-path globs) names the layers instead of the automatic grouping; ``output`` picks one
    of a model's several outputs (``trace.select_output``). ``example_inputs`` (a tensor with its
    batch axis, or a tuple of the model's inputs: token ids and an attention mask) replaces
    ``input_size`` for inputs that are not one float image: token ids, other dtypes, several inputs.
    ``frontend``: which tracer reads the model (``passes/frontend.py``: fx, export, auto)."""
    examples = check_example_inputs(example_inputs, input_size)
    if examples is None:
        size = check_input_size(input_size if input_size is not None else default_input_size(model))
        examples = (torch.randn(1, *size),)
    if not isinstance(max_bundle, int) or isinstance(max_bundle, bool) or max_bundle < 1:
        raise AugLocalError.bad_value("max_bundle", max_bundle, "is not an integer >= 1")
    with eval_mode(model):
        gm, traced_with = trace_with(model, frontend, examples, output)
        profile_graph(gm, examples)
    act = activation_nodes(gm.graph)
    live = live_sets(gm.graph, act)
    cuts = cut_points(gm.graph, act, max_bundle, live)
    spans, head, notes = find_layers(gm, model, act, cuts, live, patterns=layers)
    entries = input_nodes(gm.graph)
    crossing = set(entries) | {t for span in spans for t in live.get(span.boundary, ()) if is_tensor(t)}
    with eval_mode(model):
        axes = measure_axes(gm, examples, [n for n in gm.graph.nodes if n in crossing])
    extra = [{"size": list(x.shape[1:]), "dtype": _dtype(x), "layout": axes.of(p)}
             for x, p in zip(examples[1:], entries[1:])]
    return Analysis(gm, act, cuts, live, spans, head, tuple(examples[0].shape[1:]), notes, max_bundle,
                    gm.meta["output"], [gm.meta["output_note"]] if gm.meta["output_note"] else [], axes,
                    _dtype(examples[0]), extra, traced_with)


def _dtype(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def check_example_inputs(example_inputs, input_size=None) -> tuple[torch.Tensor, ...] | None:
    """The model's inputs (each batch first, cut to one sample) ``example_inputs`` holds: one
    tensor, or a tuple of them in forward's order; None when not given."""
    if example_inputs is None:
        return None
    if input_size is not None:
        raise AugLocalError("pass either input_size= or example_inputs=, not both: example_inputs fixes the size")
    inputs = tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)
    if not inputs:
        raise AugLocalError.bad_value("example_inputs", "an empty tuple", "holds no input; give the model's "
                                      "input tensor(s), e.g. torch.zeros(1, 128, dtype=torch.long)")
    for i, x in enumerate(inputs):
        what = "example_inputs" if len(inputs) == 1 else f"example_inputs[{i}]"
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise AugLocalError.bad_value(what, type(x).__name__, "is not a tensor with a batch axis; "
                                          "give e.g. torch.zeros(1, 128, dtype=torch.long)")
        if x.shape[0] != inputs[0].shape[0]:
            raise AugLocalError.bad_value(what, f"a batch of {x.shape[0]}", f"differs from the first input's "
                                          f"batch of {inputs[0].shape[0]}; give every input the same batch")
        check_input_size(x.shape[1:])
    return tuple(x[:1].detach().cpu() for x in inputs)


def _layer_info(a: Analysis, span: LayerSpan, in_node: fx.Node, seen: set[int]) -> LayerInfo:
    params = 0
    stack = list(span.nodes)
    visited: set[fx.Node] = set()
    while stack:  # the span's own modules plus parameters reached through constant nodes
        n = stack.pop()
        if n in visited:
            continue
        visited.add(n)
        for p in node_params(a.gm, n):
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
        stack.extend(x for x in n.all_input_nodes if x not in a.act)
    saved = _saved(span)
    out = span.boundary if span.boundary.op != "output" else (span.nodes[-1] if span.nodes else in_node)
    crossing = a.live.get(span.boundary, ()) if span.boundary.op != "output" else ()
    convs, others = _entry(a, span, in_node)
    return LayerInfo(
        entry_convs=convs,
        entry_others=others,
        name=span.name,
        boundary=span.boundary.name,
        in_shape=list(in_node.meta.get("shape") or ())[1:],
        out_shape=list(out.meta.get("shape") or ())[1:],
        params=int(params),
        flops=int(sum(n.meta.get("flops", 0) for n in span.nodes)),
        act_bytes=int(sum(saved.values())),
        crossing=[list(t.meta["shape"])[1:] if is_tensor(t) else [] for t in crossing],
        crossing_dtypes=[_kind(t) for t in crossing],
        crossing_layouts=_layouts(a, crossing),
    )


def _layouts(a: Analysis, crossing) -> list[str]:
    """Per crossing slot, its measured layout ("nchw", "ncl", "ntc", ...; ``axes.py``); "" for a size."""
    return [a.axes.of(t) if is_tensor(t) else "" for t in crossing]


def _kind(n: fx.Node) -> str:
    """A tensor's dtype ("float32", "bool"), or for a size handed on: "batch" or "int=<value>";
    "none" for a value that is None."""
    if is_none(n):
        return "none"
    if not is_tensor(n):
        return "batch" if shape_read(n) == "batch" else f"int={n.meta['value']}"
    meta = n.meta.get("tensor_meta")
    return str(getattr(meta, "dtype", "float32")).removeprefix("torch.")


def layer_infos(a: Analysis) -> tuple[list[LayerInfo], LayerInfo]:
    """Figures of every layer and of the head, in order (parameters shared by two count once)."""
    seen: set[int] = set()
    prev = input_nodes(a.gm.graph)[0]
    infos = []
    for span in a.layers:
        infos.append(_layer_info(a, span, prev, seen))
        prev = span.boundary
    head = _layer_info(a, a.head, prev, seen)
    for info, before in zip([*infos[1:], head], infos):  # what rides along into each layer
        info.carried_bytes = sum(slot_bytes(shape, kind) for shape, kind in
                                 zip(before.crossing[:-1], before.crossing_dtypes[:-1]))
    saved = [_saved(span) for span in [*a.layers, a.head]]
    for info, mine, before in zip([*infos[1:], head], saved[1:], saved):  # saved on both sides of a cut
        info.shared_bytes = sum(mine[k] for k in mine.keys() & before.keys())
    return infos, head


def _entry(a: Analysis, span: LayerSpan, in_node: fx.Node) -> tuple[list[list[int]], str]:
    """``LayerInfo.entry_convs`` and ``entry_others`` of the layer ``span`` that takes ``in_node``'s value."""
    if len(a.live.get(in_node, (in_node,))) != 1:  # a bundle comes in: copies are not widened
        return [], "reads"
    nodes = set(span.nodes)
    convs, others = [], []
    for u in in_node.users:
        if u not in nodes:
            continue
        m = entry_conv(a.gm, u, in_node)
        if m is not None:
            convs.append([m.in_channels, m.out_channels, math.prod(m.kernel_size), int(m.bias is not None)])
        else:
            others.append(u)
    key = in_node.meta.get("storage")
    saves = key is not None and any(key in u.meta.get("saved", {}) for u in others)
    return convs, ("saves" if saves else "reads") if others else ""


def _saved(span: LayerSpan) -> dict[int, int]:
    """Storage key -> bytes of what the span's nodes save for backward (one fake run: keys agree)."""
    saved: dict[int, int] = {}
    for n in span.nodes:
        saved.update(n.meta.get("saved", {}))
    return saved


def build_plan(model: nn.Module, options: PlanConfig | int | None = None, /, *,
               analysis: Analysis | None = None, example_inputs=None, **overrides) -> Plan:
    """Trace and analyse ``model`` and plan its split into local blocks.

    ``options``: a ``PlanConfig`` or the number of blocks K; keywords override its fields
    (``blocks=16, aux_depth=3``; the options and their help: ``PlanConfig``). Pass ``analysis``
    (from ``analyze_model``) to plan the same model several ways without tracing it again.
    ``example_inputs`` (a tensor, batch first, or a tuple of the model's inputs) plans a model whose
    input is not one float image: token ids, other dtypes, token ids and their attention mask.

    Example:
        >>> plan = build_plan(timm.create_model("resnet50"), blocks=16)
        >>> len(plan.layers), len(plan.blocks), len(plan.aux)
        (17, 16, 15)
    """
    c = resolve(PlanConfig, options, overrides, "build_plan")
    policy, kind = get_balance(c.balance), get_rule(c.rule)
    a = analysis or analyze_model(model, c.input_size, c.max_bundle, c.layers, c.output, example_inputs, c.frontend)
    layers, head = layer_infos(a)
    light = kind.copies_layers and wants_light_head(c.aux_head, head, layers, c.light_width)
    name = c.model or registered_name(model)
    n = len(layers)
    blocks = 1 if kind.one_block else c.blocks  # no aux nets: the whole model is one block, whatever blocks= says
    if blocks is None:
        raise AugLocalError("pass blocks=K, the number of local blocks")
    if not 1 <= blocks <= n:
        raise AugLocalError.bad_value("blocks", blocks, f"is out of range for {name} (it has {n} layers): "
                                      f"use 1..{n}")
    tau, depth = float(c.pyramid), c.aux_depth
    if policy.partition_units is not None:  # a whole-unit cost: aux nets estimated only where they copy layers
        aux = aux_figures(layers, head, blocks, depth, tau, c.tail, copies=kind.copies_layers, light=light,
                          width=c.light_width, widen=c.adapters == "widen")
        kept = len(apply_tail([[i] for i in range(blocks)], depth, c.tail))
        unit = unit_cost(layers, aux, c.batch, lambda j: j < kept - 1, recompute=c.recompute, aux_dtype=c.aux_dtype)
        groups = policy.partition_units(n, blocks, unit)
    else:  # a balance that weighs aux nets can only estimate copies of layers (their profile is known)
        extra = (aux_extra(layers, head, blocks, depth, tau, c.tail, light, c.light_width, c.adapters == "widen")
                 if policy.weighs_aux and kind.copies_layers else None)
        groups = policy.split([policy.layer_cost(x) for x in layers], blocks, extra)
    groups = apply_tail(groups, depth, c.tail)
    aux = [] if kind.one_block else _aux_recipes(groups, n, depth, tau, kind, light)
    config = dataclasses.replace(
        c, model=name, blocks=blocks, pyramid=tau, input_size=list(a.input_size), max_bundle=a.max_bundle,
        layers=list(c.layers) if c.layers is not None else None, output=a.output, input_dtype=a.input_dtype,
        input_layout=a.axes.of(input_nodes(a.gm.graph)[0]), extra_inputs=[dict(x) for x in a.extra_inputs],
        traced_with=a.traced_with)
    notes = a.output_notes + _granularity_notes(name, model, a)
    plan = Plan(config, layers, head, [BlockInfo(i, g) for i, g in enumerate(groups)], aux, notes)
    return dataclasses.replace(plan, fingerprint=plan_fingerprint(model, plan))  # another model's plan is refused


def wants_light_head(policy: str, head: LayerInfo, layers: list[LayerInfo], width: int = LIGHT_WIDTH) -> bool:
    """Whether aux nets end with a light head under ``policy`` for a model of ``layers`` and ``head``
    (auto: the head is heavy and larger than any light head that could replace it). A light head
    predicts once per sample: never for a head that predicts per position (a language model's
    next tokens, ``(tokens, vocabulary)`` a sample)."""
    per_position = len(head.out_shape or []) > 1
    if policy == "light" and per_position:
        raise AugLocalError.bad_value("aux_head", "light", f"cannot replace {head.name}, which predicts per position "
                                      f"(output {tuple(head.out_shape)} a sample); a light head predicts once per "
                                      "sample: use aux_head='copy'")
    if policy != "auto" or per_position:
        return policy == "light"
    total = head.params + sum(x.params for x in layers)
    if head.params <= HEAVY_HEAD_SHARE * total:
        return False
    classes = head.out_shape[-1] if head.out_shape else 0
    known = [x for x in layers if x.bundle[-1] and has_channels(x.bundle[-1], resolve_layout(x.bundle[-1], x.layouts[-1]))]
    if not known:
        return False
    largest = max(light_head_info(x.bundle[-1], x.layouts[-1], classes, width).params for x in known)
    return largest < head.params


def _granularity_notes(name: str, model: nn.Module, a: Analysis) -> list[str]:
    """One line when the model yields a single layer, or fewer than half as many layers as it has
    repeated blocks: which boundary has no cut, and why."""
    n, blocks = len(a.layers), repeated_blocks(model)
    if n > 1 and 2 * n >= blocks:
        return []
    why = a.notes[0] if a.notes else "its modules group into no finer runs between cuts"
    what = (f"{name} has a single layer, so it trains as one block (plain backprop)" if n == 1 else
            f"{name} splits into only {n} layers though it has {blocks} repeated blocks")
    return [f"{what}: {why} (a cut may hand on at most max_bundle={a.max_bundle} tensors)"]


def _aux_recipes(groups: list[list[int]], n: int, aux_depth: int, tau: float, kind: Rule,
                 light: bool) -> list[AuxRecipe]:
    depths = pyramid_depths(len(groups) - 1, aux_depth, tau)
    aux = []
    for i, (g, d) in enumerate(zip(groups[:-1], depths)):
        selected = select_layers(g[-1], n, d) if kind.copies_layers else []  # other rules copy nothing
        aux.append(AuxRecipe(block=i, selected_layers=selected, depth=len(selected), light_head=light))  # near the output fewer remain
    return aux

