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
from torch import nn

from auglocal_fx import to_auglocal
from auglocal_fx.partition import BALANCERS
from auglocal_fx.recipe import pyramid_depths

from conftest import assert_gradient_isolation

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLASSES = 5


class PlainCNN(nn.Module):
    def __init__(self, widths: list[int], strides: list[int]):
        super().__init__()
        layers, cin = [], 3
        for w, s in zip(widths, strides):
            layers.append(nn.Sequential(nn.Conv2d(cin, w, 3, s, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()))
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if cin == cout and stride == 1 else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


class ResidualCNN(nn.Module):
    def __init__(self, widths: list[int], strides: list[int]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for w, s in zip(widths, strides):
            blocks.append(Residual(cin, w, s))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, CLASSES)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class TokenBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TokenMLP(nn.Module):
    """Patches -> tokens (T, D) -> residual MLP blocks -> mean over tokens -> classifier."""

    def __init__(self, dim: int, depth: int, patch: int = 4):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[TokenBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, CLASSES)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.fc(self.norm(self.blocks(x)).mean(1))


@st.composite
def models(draw):
    kind = draw(st.sampled_from(["plain", "residual", "tokens"]))
    n = draw(st.integers(2, 5))
    if kind == "tokens":
        return TokenMLP(draw(st.sampled_from([8, 16])), n)
    widths = draw(st.lists(st.sampled_from([4, 8, 12]), min_size=n, max_size=n))
    strides = draw(st.lists(st.sampled_from([1, 2]), min_size=n, max_size=n))
    return (PlainCNN if kind == "plain" else ResidualCNN)(widths, strides)


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
