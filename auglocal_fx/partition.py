"""Pass 3 — partition: split L layers into K contiguous blocks, and the cost model it balances.

Balance policies live in one small registry, like timm's model registry: ``layers`` (the paper:
equal layer counts), ``flops`` and ``memory`` (minimise the largest block's cost, exactly). Each
carries its per-layer cost; ``memory`` also weighs each block's aux net, because block-wise
training holds a block's activations and its aux net's at once (``unit_act_bytes``), and every
tensor of a bundle riding along (a U-Net skip) is held too: a layer's memory cost counts the
skips it takes besides the newest tensor (``LayerInfo.carried_bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import AugLocalError
from .plan import LayerInfo, Plan
from .registry import Registry

__all__ = ["Balance", "BALANCERS", "register_balance", "get_balance", "partition", "equal_counts",
           "min_max_partition", "aux_act_bytes", "unit_act_bytes"]

Extra = Callable[[int, int], float]  # (block index, its last layer) -> cost added to that block
Split = Callable[[Sequence[float], int, Extra | None], list[list[int]]]


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


@dataclass(frozen=True)
class Balance:
    """A balance policy: the cost of one layer, and how blocks are cut from the costs.

    ``weighs_aux``: a block's cost also counts its aux net's (``extra``), as activation memory must.
    """

    name: str
    summary: str  # one line, for --help and the README
    layer_cost: Callable[[LayerInfo], float]
    split: Split
    weighs_aux: bool = False


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
register_balance(Balance("memory", "minimise the largest block + aux net activation memory",
                         lambda layer: layer.act_bytes + layer.carried_bytes, min_max_partition, weighs_aux=True))


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
def aux_act_bytes(layers: list[LayerInfo], head: LayerInfo, last: int, selected: list[int]) -> int:
    """Estimated activation bytes (per sample) of an aux net that copies layers ``selected`` after a
    block ending at layer ``last``.

    Copied layers see the shapes they see in the backbone, so they save what they save there; a
    (C, H, W) adapter's norm also saves its conv's output (for every tensor of a bundle it makes);
    the head copy saves what the head does.
    """
    total, bundle = head.act_bytes, layers[last].bundle
    for j in [*selected, len(layers)]:
        into = layers[j - 1].bundle  # what layer j (or the head) takes
        if into != bundle:
            total += sum(4 * math.prod(t) for t in into if len(t) == 3)  # float32, as profiled
        bundle = layers[j].bundle if j < len(layers) else into
    return total + sum(layers[j].act_bytes for j in selected)


def unit_act_bytes(plan: Plan) -> list[int]:
    """Estimated activation bytes per sample alive at each block's peak: block + aux net (the last:
    block + head). Under block-wise training the largest of these is the step's activation peak."""
    out = []
    for b in plan.blocks:  # skips riding along into the block are held while it runs
        own = plan.block_sum(b, "act_bytes") + plan.layers[b.layers[0]].carried_bytes
        if b.index < len(plan.aux):
            own += aux_act_bytes(plan.layers, plan.head, b.layers[-1], plan.aux[b.index].selected_layers)
        else:
            own += plan.head.act_bytes
        out.append(own)
    return out
