"""What a training step holds in memory, estimated from the plan: weights, gradients, optimizer
state and activations, per unit and in total.

Under block-wise training the weights and optimizer state of every unit (block + aux net) are
held all step; with per-unit optimizer steps only one unit's gradients are alive at a time, and
only one unit's activations ever are. So the step's peak is

    sum over units of (weights + optimizer state)  +  max over units of (gradients + batch x activations)

(without per-unit steps every gradient stays until ``opt.step()``: the gradients join the sum).
``balance="memory"`` minimises this figure at the plan's batch; ``tools/bench_memory.py`` sets it
beside the measured peak. Activations per sample are the profiled saved-for-backward bytes
(``partition.unit_act_bytes``); buffers, the input batch and allocator slack are left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .passes.partition import aux_params, unit_act_bytes
from .plan import Plan

__all__ = ["Footprint", "UnitFootprint", "estimate_footprint", "bp_footprint", "crossover_batch", "memory_summary",
           "unit_bytes", "unit_params"]

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
    from the profiled layers it copies (``partition.aux_params``)."""
    out = []
    for b in plan.blocks:
        own = plan.block_sum(b, "params")
        recipe = plan.aux_for(b.index)
        if recipe is None:
            out.append((own + plan.head.params, 0))
            continue
        aux = recipe.params or aux_params(plan.layers, plan.head, b.layers[-1], recipe.selected_layers,
                                          recipe.light_head)
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
                       aux_dtype: str | None = None) -> Footprint:
    """The step's peak at ``batch`` (default: the plan's ``config.batch``) for an optimizer holding
    ``optimizer_slots`` tensors per parameter (1: SGD with momentum, 2: Adam), with or without
    per-unit optimizer steps, with ``recompute`` ("block": each block's forward is recomputed in
    its backward, so a block's and its aux net's activations are never alive together) and aux
    nets held in ``aux_dtype`` (both default to the plan's).

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
    return Footprint(batch=batch, weights=sum(u.weights for u in units),
                     gradients=max(grads) if per_unit_steps else sum(grads),
                     optimizer=sum(u.optimizer for u in units),
                     activations=batch * max(u.act_per_sample for u in units), units=units)


def bp_footprint(plan: Plan, batch: int | None = None, *, optimizer_slots: int = 1) -> Footprint:
    """The same model trained end to end (one block, no aux nets): every layer's activations at once."""
    batch = plan.config.batch if batch is None else batch
    params = sum(x.params for x in plan.layers) + plan.head.params
    act = (sum(x.act_bytes - x.shared_bytes for x in plan.layers) + plan.layers[0].shared_bytes
           + plan.head.act_bytes - plan.head.shared_bytes)  # each storage once
    weights = 4 * params
    unit = UnitFootprint(params, 0, weights, weights, optimizer_slots * weights, act)
    return Footprint(batch, weights, weights, optimizer_slots * weights, batch * act, [unit])


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
    est, bp = estimate_footprint(plan), bp_footprint(plan)
    c = plan.config
    return {"batch": est.batch,
            "assumes": f"SGD with momentum, optimizer step per unit, recompute={c.recompute}, aux {c.aux_dtype}",
            "units": [asdict(u) for u in est.units],
            "total": {k: v for k, v in est.to_dict().items() if k not in ("units", "batch")},
            "bp_total": bp.total, "crossover_batch": crossover_batch(plan) if len(plan.blocks) > 1 else None}
