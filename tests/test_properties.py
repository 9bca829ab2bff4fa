"""Properties over random small models (plain CNNs, residual CNNs, token MLPs) and random K, d, tau, balance.

For every drawn model and setting: the converted net computes exactly what the model does in eval
mode; blocks are gradient-isolated; the partition covers every layer once, in order; each aux
net's selection strictly increases, lies after its block and ends with the last layer; pyramid
depths never increase and stay within [1, d].
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auglocal_fx import to_auglocal
from auglocal_fx.passes.partition import BALANCERS
from auglocal_fx.passes.selection import pyramid_depths

from checks import assert_gradient_isolation
from handwritten import PlainCNN, ResNet, TokenMLP

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLASSES = 5


@st.composite
def models(draw):
    kind = draw(st.sampled_from(["plain", "residual", "tokens"]))
    n = draw(st.integers(2, 5))
    if kind == "tokens":
        return TokenMLP(draw(st.sampled_from([8, 16])), n, num_classes=CLASSES)
    widths = draw(st.lists(st.sampled_from([4, 8, 12]), min_size=n, max_size=n))
    strides = draw(st.lists(st.sampled_from([1, 2]), min_size=n, max_size=n))
    return (PlainCNN if kind == "plain" else ResNet)(widths, strides, num_classes=CLASSES)


@PROPERTY
@given(model=models(), data=st.data())
def test_random_model_properties(model, data):
    torch.manual_seed(0)
    size = (3, 16, 16)
    net0 = to_auglocal(model, 1, input_size=size)  # K = 1 always works; it tells L
    n_layers = len(net0.plan.layers)
    k = data.draw(st.integers(1, n_layers), label="K")
    d = data.draw(st.integers(1, 3), label="d")
    tau = data.draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]), label="tau")
    balance = data.draw(st.sampled_from(sorted(BALANCERS)), label="balance")
    net = to_auglocal(model, k, aux_depth=d, pyramid=tau, balance=balance, input_size=size, plan=None)
    plan = net.plan

    # the partition covers every layer once, in order, in exactly K non-empty blocks
    assert len(plan.blocks) == k
    assert [i for b in plan.blocks for i in b.layers] == list(range(n_layers))
    assert all(b.layers for b in plan.blocks)

    # selections: strictly increasing, after the block, ending with the last layer
    for r in plan.aux:
        last = plan.blocks[r.block].layers[-1]
        sel = r.selected_layers
        assert sel, "every aux net copies at least one later layer (d >= 1)"
        assert all(a < b for a, b in zip(sel, sel[1:])) and sel[0] > last and sel[-1] == n_layers - 1

    # pyramid depths never increase and stay within [1, d]; what is copied never exceeds them
    depths = pyramid_depths(len(plan.aux), d, tau)
    assert all(1 <= x <= d for x in depths) and all(a >= b for a, b in zip(depths, depths[1:]))
    assert all(r.depth == len(r.selected_layers) <= depths[i] for i, r in enumerate(plan.aux))

    # eval parity, bit for bit
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, *size, generator=g), torch.randint(0, CLASSES, (4,), generator=g)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), model.eval()(x))

    # gradient isolation
    assert_gradient_isolation(net, x, y)
