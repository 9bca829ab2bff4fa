"""The cost model: every estimate made from a plan's profiled figures, in two modules.

``aux_costs.py`` says what one aux net holds (parameters and activation bytes, from the layers it
copies, its adapters and its head or light head); this module, what each unit (a block with its
aux net) holds while it runs, the cost closures the partition algorithms minimise
(``passes/partition.py`` keeps only the algorithms), each unit's training FLOPs for pipeline
stages, and what a whole training step holds in memory: weights, gradients, optimizer state and
activations, per unit and in total.

Under block-wise training the weights and optimizer state of every unit (block + aux net) are
held all step; with per-unit optimizer steps only one unit's gradients are alive at a time, and
only one unit's activations ever are. So the step's peak is

    sum over units of (weights + optimizer state)  +  max over units of (gradients + batch x activations)

(without per-unit steps every gradient stays until ``opt.step()``: the gradients join the sum).
``balance="memory"`` minimises this figure at the plan's batch; ``tools/bench_memory.py`` sets it
beside the measured peak. Activations per sample are the profiled saved-for-backward bytes
(``unit_act_bytes``); buffers, the input batch and allocator slack are left out.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

import torch

from .aux_costs import aux_act_bytes, aux_params
from .errors import AugLocalError
from .passes.partition import UnitCost
from .plan import LayerInfo, Plan, is_size_kind

__all__ = ["Footprint", "UnitFootprint", "estimate_footprint", "bp_footprint", "crossover_batch", "memory_summary",
           "unit_bytes", "unit_params", "unit_act_bytes", "slot_bytes", "unit_cost", "BACKWARD_FACTOR", "unit_costs"]

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class UnitFootprint:
    """One unit: a block and its aux net (the last block: with the model's head)."""

    params: int
    aux_params: int  # of those, the aux net's
    weights: int  # bytes
    gradients: int  # bytes, alive while the unit's backward runs (until its optimizer step)
    optimizer: int  # bytes
    act_per_sample: int  # bytes saved for backward, one sample, at the unit's peak


@dataclass
class Footprint:
    """Estimated peak bytes of one training step at ``batch``, and where they go."""

    batch: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    units: list[UnitFootprint] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def unit_params(plan: Plan) -> list[tuple[int, int]]:
    """Per unit, (parameters, of which the aux net's): a built aux net's count, else the estimate
    from the profiled layers it copies (``aux_params``)."""
    out = []
    for b in plan.blocks:
        own = plan.block_sum(b, "params")
        recipe = plan.aux_for(b.index)
        if recipe is None:
            out.append((own + plan.head.params, 0))
            continue
        aux = recipe.params or aux_params(plan.layers, plan.head, b.layers[-1], recipe.selected_layers,
                                          recipe.light_head, plan.config.light_width, plan.config.adapters == "widen")
        out.append((own + aux, aux))
    return out


def unit_bytes(params: int, aux: int, own_act: int, aux_act: int, batch: int, *, optimizer_slots: int = 1,
               recompute: str = "none", aux_dtype: str = "float32") -> tuple[int, int, int]:
    """(weights, optimizer state, gradients + ``batch`` x activations at the unit's peak) of a unit
    with ``params`` parameters (``aux`` of them its aux net's) saving ``own_act`` bytes per sample
    in its block and ``aux_act`` in its aux net. The one formula the planner balances and the
    footprint reports."""
    scale = _ITEMSIZE[aux_dtype] / 4
    weights = int(4 * (params - aux) + 4 * scale * aux)
    aux_act = int(aux_act * scale)
    act = max(own_act, aux_act) if recompute == "block" else own_act + aux_act
    return weights, optimizer_slots * weights, weights + batch * act


def estimate_footprint(plan: Plan, batch: int | None = None, *, per_unit_steps: bool = True,
                       optimizer_slots: int = 1, recompute: str | None = None,
                       aux_dtype: str | None = None, offload: str = "none") -> Footprint:
    """The step's peak at ``batch`` (default: the plan's ``config.batch``) for an optimizer holding
    ``optimizer_slots`` tensors per parameter (1: SGD with momentum, 2: Adam), with or without
    per-unit optimizer steps, with ``recompute`` ("block": each block's forward is recomputed in
    its backward, so a block's and its aux net's activations are never alive together) and aux
    nets held in ``aux_dtype`` (both default to the plan's). ``offload="aux"``: the aux nets' weights
    and optimizer state are on the device only for the unit that trains and the next one (the
    largest two in a row).

    Example:
        >>> f = estimate_footprint(net.plan, batch=32)
        >>> f.total / 2**30, f.activations / f.total
    """
    c = plan.config
    batch = c.batch if batch is None else batch
    options = {"optimizer_slots": optimizer_slots, "recompute": recompute or c.recompute,
               "aux_dtype": aux_dtype or c.aux_dtype}
    units = []
    for b, (params, aux), (own, top) in zip(plan.blocks, unit_params(plan), _unit_acts(plan)):
        opts = options if plan.aux_for(b.index) else {**options, "aux_dtype": "float32"}  # the head: the model's
        weights, opt, _ = unit_bytes(params, aux, own, top, 0, **opts)
        act = unit_bytes(params, aux, own, top, 1, **opts)[2] - weights
        units.append(UnitFootprint(params, aux, weights, weights, opt, act))
    grads = [u.gradients for u in units]
    weights, optimizer = sum(u.weights for u in units), sum(u.optimizer for u in units)
    if offload == "aux":
        # the aux part of each unit's weights and state; what is resident: two aux nets in a row
        aux_w = [u.weights - unit_bytes(u.params - u.aux_params, 0, 0, 0, 0, **options)[0]
                 for u in units if u.aux_params]
        resident = max((a + b for a, b in zip(aux_w, aux_w[1:])), default=sum(aux_w))
        weights += resident - sum(aux_w)
        optimizer += optimizer_slots * (resident - sum(aux_w))
    elif offload != "none":
        raise AugLocalError(f"offload={offload!r}: choose none or aux")
    return Footprint(batch=batch, weights=weights, gradients=max(grads) if per_unit_steps else sum(grads),
                     optimizer=optimizer, activations=batch * max(u.act_per_sample for u in units), units=units)


def bp_footprint(plan: Plan, batch: int | None = None, *, optimizer_slots: int = 1) -> Footprint:
    """The same model trained end to end (one block, no aux nets): every layer's activations at once."""
    batch = plan.config.batch if batch is None else batch
    params = sum(x.params for x in plan.layers) + plan.head.params
    act = (sum(x.act_bytes - x.shared_bytes for x in plan.layers) + plan.layers[0].shared_bytes
           + plan.head.act_bytes - plan.head.shared_bytes)  # each storage once
    weights = 4 * params
    unit = UnitFootprint(params, 0, weights, weights, optimizer_slots * weights, act)
    return Footprint(batch, weights, weights, optimizer_slots * weights, batch * act, [unit])


def checkpointed_footprint(plan: Plan, batch: int | None = None, *, optimizer_slots: int = 1) -> Footprint:
    """The same model trained end to end with activation checkpointing at ``plan``'s block
    boundaries (``checkpointed.py``): bp's weights, gradients and optimizer state; as activations,
    while block i is recomputed in the backward, the boundaries before it and block i's own (the
    last block with the head's), the largest of those moments."""
    bp = bp_footprint(plan, batch, optimizer_slots=optimizer_slots)
    held, peak = 0, 0
    for i, b in enumerate(plan.blocks):
        own = plan.block_act_bytes(b) + plan.layers[b.layers[0]].carried_bytes
        if i == len(plan.blocks) - 1:
            own += plan.head.act_bytes - plan.head.shared_bytes
        peak = max(peak, held + own)
        held += plan.layers[b.layers[-1]].bundle_bytes  # its output, kept
    return dataclasses.replace(bp, activations=bp.batch * peak)


def _unit_acts(plan: Plan) -> list[tuple[int, int]]:
    """Per unit, activation bytes per sample of its block and of what it trains with (aux net or head)."""
    if len(plan.blocks) == 1:
        return [(plan.block_act_bytes(plan.blocks[0]), plan.head.act_bytes - plan.head.shared_bytes)]
    out = []
    for b, total in zip(plan.blocks, unit_act_bytes(plan)):
        own = plan.block_act_bytes(b) + plan.layers[b.layers[0]].carried_bytes
        out.append((own, total - own))
    return out


def crossover_batch(plan: Plan, **options) -> int | None:
    """The smallest batch at which ``estimate_footprint(plan, batch, **options)`` falls below
    ``bp_footprint``'s: the fixed bytes (weights, optimizer state, gradients) of the aux nets are
    paid back by holding one unit's activations instead of the whole model's. None if never."""
    def line(f):  # (fixed bytes, bytes per sample): both totals are linear in the batch
        fixed = f(0).total
        return fixed, f(1).total - fixed

    (a0, a1), (b0, b1) = line(lambda b: estimate_footprint(plan, b, **options)), line(lambda b: bp_footprint(plan, b))
    if a1 >= b1:
        return None if a0 >= b0 else 1
    return max(1, (a0 - b0) // (b1 - a1) + 1)


def memory_summary(plan: Plan) -> dict:
    """The footprint at the plan's batch as plain data, for the plan table and JSON
    (``auglocal-convert``): per unit its weights, gradients, optimizer state and activations per
    sample; the step's total and its parts; bp's total; the crossover batch."""
    est, bp, ck = estimate_footprint(plan), bp_footprint(plan), checkpointed_footprint(plan)
    c = plan.config
    return {"batch": est.batch,
            "assumes": f"SGD with momentum, optimizer step per unit, recompute={c.recompute}, aux {c.aux_dtype}",
            "units": [asdict(u) for u in est.units],
            "total": {k: v for k, v in est.to_dict().items() if k not in ("units", "batch")},
            "offload_total": estimate_footprint(plan, offload="aux").total if plan.aux else None,
            "bp_total": bp.total, "bp_checkpointed_total": ck.total,
            "crossover_batch": crossover_batch(plan) if len(plan.blocks) > 1 else None}


# -- units: a block with its aux net (the last: with the model's head) ------------------------------


def unit_act_bytes(plan: Plan) -> list[int]:
    """Estimated activation bytes per sample alive at each block's peak: block + aux net (the last:
    block + head). Under block-wise training the largest of these is the step's activation peak."""
    out = []
    for b in plan.blocks:  # skips riding along into the block are held while it runs
        own = plan.block_act_bytes(b) + plan.layers[b.layers[0]].carried_bytes
        if b.index < len(plan.aux):  # a built aux net's figure, else the estimate for copies
            recipe = plan.aux[b.index]
            own += recipe.act_bytes or aux_act_bytes(plan.layers, plan.head, b.layers[-1], recipe.selected_layers,
                                                     recipe.light_head, plan.config.light_width,
                                                     plan.config.adapters == "widen")
        else:  # the head runs in the same unit: what it shares with the last layer counts once
            own += plan.head.act_bytes - plan.head.shared_bytes
        out.append(own)
    return out


def slot_bytes(shape: list[int], kind: str) -> int:
    """Bytes of one sample of a tensor slot (0 for a size or None riding along)."""
    return 0 if is_size_kind(kind) else getattr(torch, kind).itemsize * math.prod(shape)


def unit_cost(layers: list[LayerInfo], aux, batch: int, has_aux, **options) -> UnitCost:
    """``(j, first, last) -> (held, running)`` bytes of block j over layers first..last with its aux
    net, by ``unit_bytes``: weights and optimizer state held all step; gradients and
    ``batch`` samples of activations while the unit runs (per-unit optimizer steps)."""
    params, acts, shared = [0], [0], [0]
    for x in layers:
        params.append(params[-1] + x.params)
        acts.append(acts[-1] + x.act_bytes)
        shared.append(shared[-1] + x.shared_bytes)

    def unit(j: int, first: int, last: int) -> tuple[float, float]:
        aux_p, aux_a = aux(j, last)
        own_p = params[last + 1] - params[first]
        # each storage once: what a layer shares with the one before counts only inside the block
        own_a = acts[last + 1] - acts[first] - (shared[last + 1] - shared[first + 1]) + layers[first].carried_bytes
        opts = options if has_aux(j) else {**options, "aux_dtype": "float32"}  # the head is the model's
        weights, opt, running = unit_bytes(own_p + aux_p, aux_p if has_aux(j) else 0, own_a, aux_a, batch, **opts)
        return weights + opt, running

    return unit


# -- pipeline stages -----------------------------------------------------------------------------------


BACKWARD_FACTOR = 2.0  # backward FLOPs as a multiple of forward (input and weight gradients)


def unit_costs(plan: Plan) -> list[float]:
    """Training FLOPs per sample of each unit: (1 + BACKWARD_FACTOR) x (its block's forward + its
    aux net's or, for the last unit, the head's forward)."""
    tops = [a.flops for a in plan.aux] + [plan.head.flops]
    return [(1 + BACKWARD_FACTOR) * (plan.block_sum(b, "flops") + top) for b, top in zip(plan.blocks, tops)]
