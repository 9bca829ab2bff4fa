"""Pipeline stages: the local units grouped into P contiguous stages, one per process, by cost.

A unit is a block with its aux net (the last: the last block with the model's head). Under a
pipeline each stage runs its units' forward, local losses, backwards and optimizer steps on one
batch while the stage before it already works on the next batch, so throughput is set by the
slowest stage. A stage's cost per sample is therefore what its units compute in training: the
blocks' and tops' forward FLOPs and their backwards, counted as twice the forward (the usual
estimate: a gradient for the input and one for the weights); ``balance="cost"`` splits the units
so that the largest stage cost is as small as it can be (the exact linear partition,
``partition.min_max_partition``), ``"units"`` by count as the prototype did. FLOPs are not time:
on a CPU the early blocks' large, thin maps run at a fraction of the late blocks' FLOP rate, so
``auglocal-train`` defaults to ``"time"``: each unit's forward + local loss + backward timed on
a copy of the net before training (``training/stage_timing.py``), split the same way.
``"memory"`` splits for the least memory in the largest process instead (``stage_memory``'s
estimate: a stage holds its units' weights and optimizer state, and its largest unit's activations
on top; the early units' large maps make a first stage of few units), for when memory is why you
pipeline.

What crosses between stages per sample is the boundary's tensors (the bundle the last block of
the stage hands on) plus the labels, and the input image for rules whose loss compares with it
(``infopro``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .costs import estimate_footprint, unit_costs
from .errors import AugLocalError
from .passes.partition import equal_counts, min_max_partition
from .plan import Plan

__all__ = ["STAGE_BALANCES", "StagePlan", "assign_stages", "check_stages", "stage_memory", "stages_summary",
           "stage_table"]

STAGE_BALANCES = ("time", "cost", "units", "memory")  # "time": measured seconds per unit (auglocal-train only)
@dataclass(frozen=True)
class StagePlan:
    """``units[s]``: the unit indices stage ``s`` trains; ``costs[s]``: its cost (training FLOPs per
    sample, or measured seconds per step);
    ``sent[s]``: bytes per sample stage ``s`` sends to stage ``s + 1`` (the last stage sends none)."""

    units: list[list[int]]
    costs: list[float]
    sent: list[int]

    @property
    def stages(self) -> int:
        return len(self.units)

    def stage_of(self, unit: int) -> int:
        return next(s for s, us in enumerate(self.units) if unit in us)

    @property
    def imbalance(self) -> float:
        """The slowest stage's cost over the mean: 1.0 is perfect, throughput scales with P / this."""
        return max(self.costs) / (sum(self.costs) / len(self.costs)) if sum(self.costs) else 1.0


def check_stages(stages, units: int, where: str = "stages") -> int:
    """``stages`` if it is a number of stages for ``units`` units; ``where`` names it in errors (a flag
    such as ``--stages``, a recipe key, a parameter)."""
    said = f"{where} {stages!r}" if where.startswith("--") else f"{where} = {stages!r}"
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise AugLocalError(f"{said} is not a number of pipeline stages; give an integer from 1")
    if stages > units:
        raise AugLocalError(f"{said} is more pipeline stages than the {units} block(s) the plan has; "
                            f"use at most {units}, or convert into more blocks")
    return stages


def assign_stages(plan: Plan, stages: int, balance: str = "cost", image_bytes: int = 0,
                 where: str = "stages", costs: list[float] | None = None,
                 groups: list[list[int]] | None = None) -> StagePlan:
    """Group ``plan``'s units into ``stages`` contiguous stages (``balance``: "cost", "units" or
    "memory"; with measured ``costs`` per unit, "time"). ``image_bytes``: per-sample bytes of the
    input when the rule's loss needs it at every stage. ``groups``: a split already made (a resumed
    run's)."""
    if balance not in STAGE_BALANCES:
        raise AugLocalError(f"stage balance {balance!r} is not one of {', '.join(STAGE_BALANCES)}")
    if balance == "time" and costs is None and groups is None:
        raise AugLocalError("stage balance 'time' needs measured costs per unit (auglocal-train measures them); "
                            "use 'cost' to split by FLOPs")
    costs = unit_costs(plan) if costs is None else list(costs)
    check_stages(stages, len(costs), where)
    if groups is None and balance == "memory":
        groups = _memory_partition(plan, stages, image_bytes)
    elif groups is None:
        groups = equal_counts(len(costs), stages) if balance == "units" else min_max_partition(costs, stages)
    sent = [_sent(plan, g[-1], image_bytes) for g in groups[:-1]]
    return StagePlan(groups, [sum(costs[u] for u in g) for g in groups], sent + [0])


def _sent(plan: Plan, unit: int, image_bytes: int) -> int:
    """Bytes per sample a stage ending with ``unit`` sends on: the boundary's tensors, the label."""
    return plan.layers[plan.blocks[unit].layers[-1]].bundle_bytes + 8 + image_bytes  # + the int64 label


def _memory_partition(plan: Plan, stages: int, image_bytes: int, depth: int = 2) -> list[list[int]]:
    """The contiguous split whose largest ``stage_memory`` peak is smallest (exact: dynamic
    programming over where each stage ends; a stage's peak is not a sum of its units', so the
    FLOPs partition's algorithm does not apply)."""
    f = estimate_footprint(plan)
    n = len(f.units)
    resident = [u.weights + u.optimizer for u in f.units]
    busy = [u.gradients + f.batch * u.act_per_sample for u in f.units]
    sent = [f.batch * _sent(plan, u, image_bytes) for u in range(n - 1)] + [0]

    def peak(i: int, j: int) -> int:  # units i..j-1 as one stage
        received = sent[i - 1] if i else 0
        return sum(resident[i:j]) + max(busy[i:j]) + depth * sent[j - 1] + received

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[s][j]: units 0..j-1 in s stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], peak(i, j))
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    ends, j = [], n
    for s in range(stages, 0, -1):
        ends.append(j)
        j = cut[s][j]
    bounds = [0, *reversed(ends)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def stage_memory(plan: Plan, sp: StagePlan, batch: int | None = None, depth: int = 2) -> list[dict]:
    """Per stage, the estimated bytes its process holds at ``batch`` (default: the plan's): resident
    (its units' weights and optimizer state) and peak (resident + the largest of its units' gradients
    and activations + the transport buffers: ``depth`` messages in flight to the next stage and one
    received). The runtime itself (torch, ~0.7 GiB on a CPU) comes on top."""
    f = estimate_footprint(plan, batch)
    out = []
    for s, us in enumerate(sp.units):
        units = [f.units[u] for u in us]
        resident = sum(u.weights + u.optimizer for u in units)
        busiest = max(u.gradients + f.batch * u.act_per_sample for u in units)
        transport = f.batch * (depth * sp.sent[s] + (sp.sent[s - 1] if s else 0))
        out.append({"resident_bytes": resident, "peak_bytes": resident + busiest + transport})
    return out


def stages_summary(plan: Plan, sp: StagePlan) -> dict:
    """The stage split as data (``auglocal-convert --stages --format json``)."""
    total = sum(sp.costs) or 1.0
    memory = stage_memory(plan, sp)
    return {"stages": [{"stage": s, "blocks": us, "train_flops": c, "share": c / total, "sent_bytes": b, **m}
                       for s, (us, c, b, m) in enumerate(zip(sp.units, sp.costs, sp.sent, memory))],
            "imbalance": sp.imbalance, "speedup_bound": sp.stages / sp.imbalance}


def stage_table(plan: Plan, sp: StagePlan):
    """A ``rich`` table: per stage its blocks, training FLOPs per sample and share, bytes sent per sample."""
    from rich.table import Table  # only where a table is printed

    t = Table(title=f"{sp.stages} pipeline stages", title_justify="left",
              caption=f"Training FLOPs per sample: forward + backward of the blocks and their aux nets (the last: the "
                      f"head). Slowest stage / mean {sp.imbalance:.2f}: at most {sp.stages / sp.imbalance:.2f}x one "
                      f"process's throughput. Memory per process at batch {plan.config.batch}: resident (its units' "
                      "weights + optimizer state) and peak (+ its largest unit's gradients and activations + "
                      "transport buffers), the runtime not counted.", caption_justify="left")
    for col in ("stage", "blocks", "train MFLOPs", "share", "sends KiB", "resident MiB", "peak MiB"):
        t.add_column(col, justify="left" if col == "blocks" else "right")
    total = sum(sp.costs) or 1.0
    for s, (us, c, b, m) in enumerate(zip(sp.units, sp.costs, sp.sent, stage_memory(plan, sp))):
        t.add_row(str(s), f"{us[0]}" if len(us) == 1 else f"{us[0]}-{us[-1]}", f"{c / 1e6:,.1f}",
                  f"{100 * c / total:.1f}%", f"{b / 1024:,.1f}" if b else "-",
                  f"{m['resident_bytes'] / 2**20:,.0f}", f"{m['peak_bytes'] / 2**20:,.0f}")
    return t
