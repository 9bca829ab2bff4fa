"""Pass 3 — partition: split L layers into K contiguous blocks (the cost model it balances is
``costs.py``, ``aux_costs.py``).

Balance policies live in one small registry, like timm's model registry: ``layers`` (the paper:
equal layer counts), ``flops`` and ``memory`` (minimise the largest block's cost, exactly). Each
carries its per-layer cost; ``memory`` also weighs each block's aux net, because block-wise
training holds a block's activations and its aux net's at once (``unit_act_bytes``), and every
tensor of a bundle riding along (a U-Net skip) is held too: a layer's memory cost counts the
skips it takes besides the newest tensor (``LayerInfo.carried_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import AugLocalError
from ..plan import LayerInfo
from ..registry import Registry

__all__ = ["Balance", "BALANCERS", "register_balance", "get_balance", "partition", "equal_counts",
           "min_max_partition", "min_total_partition", "Extra", "UnitCost"]

Extra = Callable[[int, int], float]  # (block index, its last layer) -> cost added to that block
Split = Callable[[Sequence[float], int, Extra | None], list[list[int]]]
# (block index, its first layer, its last layer) -> (bytes held all step, bytes held only while it runs)
UnitCost = Callable[[int, int, int], tuple[float, float]]


def equal_counts(n: int, k: int) -> list[list[int]]:
    """Contiguous blocks with sizes differing by at most one; earlier blocks take the extras."""
    size, extra = divmod(n, k)
    blocks, start = [], 0
    for i in range(k):
        end = start + size + (1 if i < extra else 0)
        blocks.append(list(range(start, end)))
        start = end
    return blocks


def min_max_partition(costs: Sequence[float], k: int, extra: Extra | None = None) -> list[list[int]]:
    """Exact linear partition: contiguous k blocks minimising the largest block cost (DP, O(k·n²)).

    Block j covering layers s..e costs ``sum(costs[s..e]) + extra(j, e)`` (``extra`` defaults to 0).
    """
    extra = extra or (lambda j, last: 0.0)
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[j][i]: smallest max-cost splitting the first i layers into j blocks; cut[j][i]: last start
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                v = max(best[j - 1][s], prefix[i] - prefix[s] + extra(j - 1, i - 1))
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, s
    blocks, i = [], n
    for j in range(k, 0, -1):
        s = cut[j][i]
        blocks.append(list(range(s, i)))
        i = s
    return blocks[::-1]


def min_total_partition(n: int, k: int, unit: UnitCost) -> list[list[int]]:
    """Exact contiguous split of ``n`` layers into ``k`` blocks minimising ``sum(held) + max(running)``,
    where ``unit(j, first, last)`` gives block j's ``(held, running)`` bytes.

    That is a training step's peak memory under block-wise training with per-unit optimizer steps:
    every unit's weights and optimizer state are held all step (a sum), one unit's gradients and
    activations at a time (a max). The two terms pull apart, so the DP keeps, per prefix, the Pareto
    front of (sum, max) pairs rather than one best value.
    """
    # front[j][i]: non-dominated (held sum, running max, start of the last block, index in front[j-1][start])
    front: list[list[list[tuple[float, float, int, int]]]] = [[[] for _ in range(n + 1)] for _ in range(k + 1)]
    front[0][0] = [(0.0, 0.0, 0, 0)]
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            cands = []
            for s in range(j - 1, i):
                if not front[j - 1][s]:
                    continue
                held, running = unit(j - 1, s, i - 1)
                cands += [(h + held, max(r, running), s, x) for x, (h, r, _, _) in enumerate(front[j - 1][s])]
            front[j][i] = _pareto(cands)
    best = min(range(len(front[k][n])), key=lambda x: sum(front[k][n][x][:2]))
    blocks, i, j, x = [], n, k, best
    while j > 0:
        _, _, s, x = front[j][i][x]
        blocks.append(list(range(s, i)))
        i, j = s, j - 1
    return blocks[::-1]


def _pareto(cands: list[tuple[float, float, int, int]]) -> list[tuple[float, float, int, int]]:
    """The candidates no other beats on both the sum and the max (ties: the first kept)."""
    out: list[tuple[float, float, int, int]] = []
    for c in sorted(cands, key=lambda c: (c[0], c[1])):
        if not out or c[1] < out[-1][1]:
            out.append(c)
    return out


@dataclass(frozen=True)
class Balance:
    """A balance policy: the cost of one layer, and how blocks are cut from the costs.

    ``weighs_aux``: a block's cost also counts its aux net's (``extra``), as activation memory must.
    ``partition_units``: given a whole-unit cost model (``UnitCost``: what a block and its aux net hold
    all step and while they run), the planner calls this instead of ``split``.
    """

    name: str
    summary: str  # one line, for --help and the docs
    layer_cost: Callable[[LayerInfo], float]
    split: Split
    weighs_aux: bool = False
    partition_units: Callable[[int, int, UnitCost], list[list[int]]] | None = None


BALANCERS: Registry[Balance] = Registry("balance", "a balance")


def register_balance(balance: Balance) -> Balance:
    """Make ``balance`` selectable as ``balance=balance.name`` (CLI ``--balance``, recipe key)."""
    return BALANCERS.register(balance.name, balance)


def get_balance(name: str) -> Balance:
    """The registered balance policy called ``name``, or a one-line error listing the choices."""
    return BALANCERS.lookup(name)


register_balance(Balance("layers", "equal layer counts (the paper)", lambda layer: 1.0,
                         lambda costs, k, extra=None: equal_counts(len(costs), k)))
register_balance(Balance("flops", "minimise the largest block's forward FLOPs", lambda layer: layer.flops,
                         min_max_partition))
register_balance(Balance("memory", "minimise the step's peak memory: weights + optimizer state of every "
                         "unit, and the largest unit's gradients + activations at the plan's batch",
                         lambda layer: layer.act_bytes + layer.carried_bytes, min_max_partition, weighs_aux=True,
                         partition_units=min_total_partition))


def partition(costs: Sequence[float], k: int, balance: str = "layers", extra: Extra | None = None) -> list[list[int]]:
    """Split ``len(costs)`` layers into ``k`` contiguous, non-empty blocks.

    Example:
        >>> partition([1, 1, 1, 1, 1], 2)
        [[0, 1, 2], [3, 4]]
    """
    policy = get_balance(balance)
    if not 1 <= k <= len(costs):
        raise AugLocalError(f"cannot split {len(costs)} layers into {k} blocks; use 1..{len(costs)}")
    return policy.split(costs, k, extra)


# -- the cost model ---------------------------------------------------------------------------------
