"""Pass 3 — partition: split L layers into K contiguous blocks.

Balance policies live in one small registry, like timm's model registry: ``layers`` (the paper:
equal layer counts), ``flops`` and ``memory`` (minimise the largest block's cost, exactly). A
block's cost may carry an ``extra(j, last)`` term besides its layers' own: what block j's aux net
adds when the block ends at layer ``last`` (its activations are alive together with the block's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import AugLocalError

__all__ = ["BALANCERS", "register_balancer", "partition", "equal_counts", "min_max_partition"]

Extra = Callable[[int, int], float]  # (block index, its last layer) -> cost added to that block
BALANCERS: dict[str, Callable[[Sequence[float], int, Extra | None], list[list[int]]]] = {}


def register_balancer(name: str):
    """Decorator: ``fn(costs, k, extra) -> blocks`` becomes selectable as ``balance=name``."""

    def wrap(fn):
        BALANCERS[name] = fn
        return fn

    return wrap


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


@register_balancer("layers")
def _by_layers(costs, k, extra=None):
    return equal_counts(len(costs), k)


@register_balancer("flops")
def _by_flops(costs, k, extra=None):
    return min_max_partition(costs, k, extra)


@register_balancer("memory")
def _by_memory(costs, k, extra=None):
    return min_max_partition(costs, k, extra)


def partition(costs: Sequence[float], k: int, balance: str = "layers", extra: Extra | None = None) -> list[list[int]]:
    """Split ``len(costs)`` layers into ``k`` contiguous, non-empty blocks.

    Example:
        >>> partition([1, 1, 1, 1, 1], 2)
        [[0, 1, 2], [3, 4]]
    """
    if balance not in BALANCERS:
        raise AugLocalError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCERS)}")
    if not 1 <= k <= len(costs):
        raise AugLocalError(f"cannot split {len(costs)} layers into {k} blocks; use 1..{len(costs)}")
    return BALANCERS[balance](costs, k, extra)
