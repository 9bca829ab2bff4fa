"""The compiler's front half: trace → analyze → layers → partition → aux recipes → Plan."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .analyze import activation_nodes, cut_points, profile_graph
from .errors import AugLocalError
from .layers import LayerSpan, find_layers, node_params
from .partition import BALANCERS, partition
from .plan import AuxRecipe, BlockInfo, LayerInfo, Plan, PlanConfig
from .recipe import apply_tail, pyramid_depths, select_layers
from .trace import trace

__all__ = ["Analysis", "analyze_model", "build_plan", "default_input_size", "unit_act_bytes"]

TAILS = ("exact", "reference")


@dataclass
class Analysis:
    """A traced, profiled graph and its layers. Node meta holds shape / flops / saved bytes."""

    gm: fx.GraphModule
    act: set[fx.Node]
    cuts: list[fx.Node]
    layers: list[LayerSpan]
    head: LayerSpan
    input_size: tuple[int, ...]


@contextmanager
def set_mode(model: nn.Module, training: bool):
    """Temporarily put ``model`` in train or eval mode; the old mode comes back afterwards."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


def eval_mode(model: nn.Module):
    """Temporarily put ``model`` in eval mode (no BN statistic updates, no dropout)."""
    return set_mode(model, False)


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """timm's ``pretrained_cfg['input_size']`` when present, else (3, 224, 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def _model_name(model: nn.Module) -> str:
    """timm's registered name (``pretrained_cfg['architecture']``) when known, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def analyze_model(model: nn.Module, input_size=None) -> Analysis:
    """Trace ``model`` (in eval mode), profile one sample, find cut points and layers."""
    size = tuple(input_size) if input_size is not None else default_input_size(model)
    if not size or any(not isinstance(s, int) or s < 1 for s in size):
        raise AugLocalError(f"bad input size {size}: give positive integers, e.g. 3 224 224")
    with eval_mode(model):
        gm = trace(model)
        example = torch.randn(1, *size)
        profile_graph(gm, example)
    act = activation_nodes(gm.graph)
    cuts = cut_points(gm.graph, act)
    layers, head = find_layers(gm, model, act, cuts)
    return Analysis(gm, act, cuts, layers, head, size)


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
    saved: dict[int, int] = {}
    for n in span.nodes:
        saved.update(n.meta.get("saved", {}))
    out = span.boundary if span.boundary.op != "output" else (span.nodes[-1] if span.nodes else in_node)
    return LayerInfo(
        name=span.name,
        boundary=span.boundary.name,
        in_shape=list(in_node.meta.get("shape") or ())[1:],
        out_shape=list(out.meta.get("shape") or ())[1:],
        params=int(params),
        flops=int(sum(n.meta.get("flops", 0) for n in span.nodes)),
        act_bytes=int(sum(saved.values())),
    )


def layer_infos(a: Analysis) -> tuple[list[LayerInfo], LayerInfo]:
    seen: set[int] = set()
    prev = next(n for n in a.gm.graph.nodes if n.op == "placeholder")
    infos = []
    for span in a.layers:
        infos.append(_layer_info(a, span, prev, seen))
        prev = span.boundary
    return infos, _layer_info(a, a.head, prev, seen)


def _aux_act_bytes(layers: list[LayerInfo], head: LayerInfo, last: int, selected: list[int]) -> int:
    """Estimated activation bytes (per sample) of the aux net of a block ending at layer ``last``.

    Copied layers see the shapes they see in the backbone, so they save what they save there; a
    (C, H, W) adapter's norm also saves its conv's output; the head copy saves what the head does.
    """
    total, shape = head.act_bytes, layers[last].out_shape
    for target in [layers[j].in_shape for j in selected] + [head.in_shape]:
        if target != shape and len(target) == 3:
            total += 4 * math.prod(target)  # float32, as profiled
        shape = target
    return total + sum(layers[j].act_bytes for j in selected)


def _memory_extra(layers, head, blocks: int, aux_depth: int, pyramid: float, tail: str):
    """``extra(j, last)`` for the memory balancer: what block j's aux net (or, for the block that
    trains with the model's head, the head) holds alive beside the block's own activations."""
    kept = len(apply_tail([[i] for i in range(blocks)], aux_depth, tail))  # blocks left after the tail
    depths = pyramid_depths(kept - 1, aux_depth, pyramid)
    n = len(layers)

    def extra(j: int, last: int) -> float:
        if j >= kept - 1:  # merged into (or is) the last block, trained by the model's head
            return head.act_bytes if j == blocks - 1 else 0.0
        return _aux_act_bytes(layers, head, last, select_layers(last, n, depths[j]))

    return extra


def unit_act_bytes(plan: Plan) -> list[int]:
    """Estimated activation bytes per sample alive at each block's peak: block + aux net (the last:
    block + head). Under block-wise training the largest of these is the step's activation peak."""
    out = []
    for b in plan.blocks:
        own = plan.block_sum(b, "act_bytes")
        if b.index < len(plan.aux):
            own += _aux_act_bytes(plan.layers, plan.head, b.layers[-1], plan.aux[b.index].selected_layers)
        else:
            own += plan.head.act_bytes
        out.append(own)
    return out


def build_plan(
    model: nn.Module,
    blocks: int,
    *,
    aux_depth: int = 2,
    pyramid: float = 0.5,
    balance: str = "layers",
    tail: str = "exact",
    input_size=None,
    model_name: str | None = None,
    num_classes: int | None = None,
    rule: str = "auglocal",
    analysis: Analysis | None = None,
) -> Plan:
    """Trace and analyse ``model`` and plan its split into ``blocks`` local blocks.

    Example:
        >>> plan = build_plan(timm.create_model("resnet50"), blocks=16)
        >>> len(plan.layers), len(plan.blocks), len(plan.aux)
        (17, 16, 15)
    """
    if not isinstance(aux_depth, int) or aux_depth < 0:
        raise AugLocalError(f"aux depth must be an integer >= 0, got {aux_depth!r}")
    if not 0.0 <= float(pyramid) <= 1.0:
        raise AugLocalError(f"pyramid coefficient tau must be in [0, 1], got {pyramid!r}")
    if balance not in BALANCERS:
        raise AugLocalError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCERS)}")
    if tail not in TAILS:
        raise AugLocalError(f"unknown tail {tail!r}; choose one of {', '.join(TAILS)}")
    a = analysis or analyze_model(model, input_size)
    layers, head = layer_infos(a)
    name = model_name or _model_name(model)
    n = len(layers)
    if not isinstance(blocks, int) or not 1 <= blocks <= n:
        raise AugLocalError(f"--blocks must be between 1 and {n} for {name} (it has {n} layers), got {blocks}")
    cost = {"layers": [1] * n, "flops": [x.flops for x in layers], "memory": [x.act_bytes for x in layers]}
    copies = rule == "auglocal"  # other rules' aux nets copy no downstream layers
    # the memory balancer weighs each block's aux net too; only auglocal's aux nets are copies it can estimate
    extra = (_memory_extra(layers, head, blocks, aux_depth, float(pyramid), tail)
             if balance == "memory" and copies else None)
    groups = apply_tail(partition(cost[balance], blocks, balance, extra), aux_depth, tail)
    depths = pyramid_depths(len(groups) - 1, aux_depth, float(pyramid))
    aux = [AuxRecipe(block=i, selected_layers=select_layers(g[-1], n, d) if copies else [], depth=d)
           for i, (g, d) in enumerate(zip(groups[:-1], depths))]
    for r in aux:  # depth is what is actually copied (near the output fewer layers remain)
        r.depth = len(r.selected_layers)
    config = PlanConfig(model=name, blocks=blocks, aux_depth=aux_depth, pyramid=float(pyramid),
                        balance=balance, tail=tail, rule=rule, input_size=list(a.input_size),
                        num_classes=num_classes)
    return Plan(config, layers, head, [BlockInfo(i, g) for i, g in enumerate(groups)], aux)
