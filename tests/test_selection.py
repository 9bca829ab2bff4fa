"""Aux recipes: uniform selection, pyramidal depth and the reference tail, against the rules as the
README states them ("How it works") and the AugLocal authors' code computes them."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auglocal_fx.passes.selection import apply_tail, pyramid_depths, select_layers

PROPERTY = settings(max_examples=100, deadline=None)


def reference_recipes(num_layers: int, k: int, depth: int, tau: float = 0.5):
    """One layer per block, reference tail: (blocks, depths, selections) as the paper's code does."""
    blocks = apply_tail([[i] for i in range(k)], depth, "reference")
    depths = pyramid_depths(len(blocks) - 1, depth, tau)
    selections = [select_layers(b[-1], num_layers, d) for b, d in zip(blocks[:-1], depths)]
    return blocks, depths, selections


# -- reference values (the rules in README "How it works") ------------------------------------------
RESNET32_D2 = [[8, 15], [8, 15], [8, 15], [9, 15], [10, 15], [10, 15], [10, 15], [11, 15], [12, 15],
               [12, 15], [12, 15], [13, 15], [14, 15]]
RESNET32_D3 = [[5, 10, 15], [6, 10, 15], [6, 11, 15], [7, 11, 15], [8, 11, 15], [8, 12, 15], [10, 15],
               [11, 15], [12, 15], [12, 15], [12, 15], [13, 15]]


def test_resnet32_depth2_reference():
    blocks, depths, sel = reference_recipes(16, 16, 2)
    assert len(blocks) == 14  # M = K - d
    assert len(depths) == 13 and len(sel) == 13
    assert depths == [2] * 13
    assert sel == RESNET32_D2


def test_resnet32_depth3_reference():
    blocks, depths, sel = reference_recipes(16, 16, 3)
    assert len(blocks) == 13
    assert depths == [3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2]
    assert sel == RESNET32_D3


def test_resnet110_depth3_reference():
    blocks, depths, sel = reference_recipes(55, 55, 3)
    assert len(blocks) == 52
    assert len(sel) == 51
    assert depths == [3] * 25 + [2] * 26
    assert sel[:4] == [[18, 36, 54], [19, 36, 54], [19, 37, 54], [20, 37, 54]]
    assert sel[25] == [40, 54]
    assert sel[50] == [52, 54]


def test_reference_tail_blocks_shape():
    blocks, _, _ = reference_recipes(16, 16, 2)
    assert blocks[:-1] == [[i] for i in range(13)]
    assert blocks[-1] == [13, 14, 15]  # the last d+1 layers train with the head


def test_docstring_examples():
    assert select_layers(0, 16, 3) == [5, 10, 15]
    assert pyramid_depths(12, 3, 0.5) == [3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2]


def test_round_half_to_even():
    # l=2, L=16, d=2: 2 + 13/2 = 8.5 -> 8 (half to even), not 9
    assert select_layers(2, 16, 2) == [8, 15]
    # l=0, L=16, d=2: 7.5 -> 8
    assert select_layers(0, 16, 2) == [8, 15]


# -- select_layers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("last, n, d, expected", [
    (10, 16, 5, [11, 12, 13, 14, 15]),  # d >= L-1-l: every later layer
    (10, 16, 9, [11, 12, 13, 14, 15]),
    (13, 16, 2, [14, 15]),
    (14, 16, 2, [15]),
    (15, 16, 2, []),  # the last layer has nothing after it
    (3, 16, 0, []),  # depth 0: head copy only
])
def test_select_layers_edges(last, n, d, expected):
    assert select_layers(last, n, d) == expected


@PROPERTY
@given(data=st.data())
def test_select_layers_properties(data):
    n = data.draw(st.integers(2, 120), label="L")
    last = data.draw(st.integers(0, n - 2), label="l")
    d = data.draw(st.integers(1, 12), label="d")
    sel = select_layers(last, n, d)
    assert len(sel) == min(d, n - 1 - last)
    assert all(a < b for a, b in zip(sel, sel[1:])), sel
    assert all(j > last for j in sel)
    assert sel[-1] == n - 1
    # exact oracle: round() of a Fraction is half-to-even too
    if d >= n - 1 - last:
        assert sel == list(range(last + 1, n))
    else:
        assert sel == [round(last + Fraction(t * (n - last - 1), d)) for t in range(1, d + 1)]


# -- pyramid_depths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_aux, d", [(1, 2), (13, 2), (12, 3), (51, 3), (7, 5)])
def test_tau_zero_keeps_depth(num_aux, d):
    assert pyramid_depths(num_aux, d, 0.0) == [d] * num_aux


def test_pyramid_tau_one_reaches_min_depth():
    depths = pyramid_depths(11, 4, 1.0)
    assert depths[0] == 4 and depths[-1] == 1


def test_pyramid_no_aux():
    assert pyramid_depths(0, 3, 0.5) == []


@PROPERTY
@given(num_aux=st.integers(0, 80), d=st.integers(1, 8),
       tau=st.floats(0.0, 1.0, allow_nan=False))
def test_pyramid_properties(num_aux, d, tau):
    depths = pyramid_depths(num_aux, d, tau)
    assert len(depths) == num_aux
    assert all(1 <= x <= d for x in depths)
    assert all(a >= b for a, b in zip(depths, depths[1:])), depths
    if num_aux:
        assert depths[0] == d


# -- apply_tail -------------------------------------------------------------------------------------
def test_apply_tail_exact_keeps_blocks():
    blocks = [[0, 1], [2], [3], [4, 5]]
    out = apply_tail(blocks, 2, "exact")
    assert out == blocks and out is not blocks


@pytest.mark.parametrize("k, d, expected", [
    (5, 2, [[0], [1], [2, 3, 4]]),
    (5, 1, [[0], [1], [2], [3, 4]]),
    (5, 0, [[0], [1], [2], [3], [4]]),  # no aux depth: nothing to merge
    (3, 3, [[0, 1, 2]]),  # K <= d: one block remains
    (2, 5, [[0, 1]]),
])
def test_apply_tail_reference(k, d, expected):
    blocks = [[i] for i in range(k)]
    assert apply_tail(blocks, d, "reference") == expected
    assert blocks == [[i] for i in range(k)]  # input left untouched


@PROPERTY
@given(k=st.integers(1, 40), d=st.integers(0, 6))
def test_apply_tail_reference_counts(k, d):
    blocks = [[2 * i, 2 * i + 1] for i in range(k)]
    out = apply_tail(blocks, d, "reference")
    assert len(out) == max(1, k - d)
    assert [x for b in out for x in b] == list(range(2 * k))
    assert all(out)
