"""Partition: layers -> K contiguous, non-empty blocks (equal counts, or min-max cost exactly)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auglocal_fx.errors import AugLocalError
from auglocal_fx.passes.partition import BALANCERS, equal_counts, min_max_partition, partition

PROPERTY = settings(max_examples=100, deadline=None)


def assert_valid(blocks, n, k):
    assert len(blocks) == k
    assert all(len(b) > 0 for b in blocks), blocks
    assert [x for b in blocks for x in b] == list(range(n)), blocks  # each layer once, in order
    for b in blocks:
        assert b == list(range(b[0], b[-1] + 1)), blocks  # contiguous


def brute_force_min_max(costs, k, extra=lambda j, last: 0):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(costs[bounds[i]:bounds[i + 1]]) + extra(i, bounds[i + 1] - 1) for i in range(k))
        best = worst if best is None else min(best, worst)
    return best


def block_costs(blocks, costs):
    return [sum(costs[i] for i in b) for b in blocks]


def test_balancers_registered():
    assert {"layers", "flops", "memory"} <= set(BALANCERS)


@pytest.mark.parametrize("n, k, expected", [
    (5, 2, [[0, 1, 2], [3, 4]]),
    (17, 16, [[0, 1]] + [[i] for i in range(2, 17)]),
    (4, 4, [[0], [1], [2], [3]]),
    (4, 1, [[0, 1, 2, 3]]),
    (10, 3, [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]),
])
def test_equal_counts_examples(n, k, expected):
    assert equal_counts(n, k) == expected
    assert partition([1.0] * n, k) == expected


@PROPERTY
@given(data=st.data())
def test_equal_counts_properties(data):
    n = data.draw(st.integers(1, 60))
    k = data.draw(st.integers(1, n))
    blocks = equal_counts(n, k)
    assert_valid(blocks, n, k)
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # earlier blocks take the extras


@PROPERTY
@given(data=st.data())
def test_partition_valid_every_balance(data):
    costs = data.draw(st.lists(st.integers(0, 1000), min_size=1, max_size=30))
    k = data.draw(st.integers(1, len(costs)))
    balance = data.draw(st.sampled_from(sorted(BALANCERS)))
    assert_valid(partition(costs, k, balance), len(costs), k)


@PROPERTY
@given(data=st.data())
def test_min_max_partition_is_optimal(data):
    costs = data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=9))
    k = data.draw(st.integers(1, len(costs)))
    blocks = min_max_partition(costs, k)
    assert_valid(blocks, len(costs), k)
    assert max(block_costs(blocks, costs)) == brute_force_min_max(costs, k)


@PROPERTY
@given(data=st.data())
def test_min_max_partition_with_extra_cost_is_optimal(data):
    """The memory balancer's aux-net term: block j ending at layer e costs its layers + extra(j, e)."""
    costs = data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=8))
    k = data.draw(st.integers(1, len(costs)))
    table = data.draw(st.lists(st.lists(st.integers(0, 80), min_size=len(costs), max_size=len(costs)),
                               min_size=k, max_size=k))
    extra = lambda j, last: table[j][last]  # noqa: E731
    blocks = min_max_partition(costs, k, extra)
    assert_valid(blocks, len(costs), k)
    worst = max(c + extra(j, b[-1]) for j, (b, c) in enumerate(zip(blocks, block_costs(blocks, costs))))
    assert worst == brute_force_min_max(costs, k, extra)


def test_extra_cost_moves_the_cut():
    # equal layers, but a block ending at layer 0 or 1 carries a large aux net: it must end later
    extra = lambda j, last: 100 if (j == 0 and last < 2) else 0  # noqa: E731
    assert partition([1, 1, 1, 1], 2, "memory", extra) == [[0, 1, 2], [3]]
    assert partition([1, 1, 1, 1], 2, "memory") == [[0, 1], [2, 3]]


@pytest.mark.parametrize("costs, k, best", [
    ([1, 1, 1, 1, 10], 2, 10),
    ([10, 1, 1, 1, 1], 2, 10),
    ([5, 5, 5, 5], 2, 10),
    ([0, 0, 0, 7], 3, 7),  # zero-cost layers still give non-empty blocks
    ([3, 1, 4, 1, 5, 9, 2, 6], 3, 14),
])
def test_min_max_partition_examples(costs, k, best):
    for balance in ("flops", "memory"):
        blocks = partition(costs, k, balance)
        assert_valid(blocks, len(costs), k)
        assert max(block_costs(blocks, costs)) == best == brute_force_min_max(costs, k)


@pytest.mark.parametrize("balance", ["speed", "", "Layers"])
def test_unknown_balance_raises(balance):
    with pytest.raises(AugLocalError, match="is not a balance; choose one of layers, flops, memory"):
        partition([1, 2, 3], 2, balance)


@pytest.mark.parametrize("n, k", [(5, 0), (5, 6), (5, -1), (1, 2), (0, 1)])
@pytest.mark.parametrize("balance", ["layers", "flops", "memory"])
def test_k_out_of_range_raises(n, k, balance):
    with pytest.raises(AugLocalError) as exc:
        partition([1] * n, k, balance)
    assert "\n" not in str(exc.value)
