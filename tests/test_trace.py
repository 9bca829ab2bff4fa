"""Tracing: clear one-line errors for untraceable models, specialised default arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from auglocal_fx import AugLocalError, build_plan
from auglocal_fx.cuts import activation_nodes
from auglocal_fx.planner import analyze_model
from auglocal_fx.trace import specialised_args, trace


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        x = self.lin(x)
        if x.sum() > 0:  # data-dependent: fx cannot trace this
            return x * 2
        return x


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.inner = DataDependent()

    def forward(self, x):
        return self.inner(self.pre(x))


class ShallowBad(nn.Module):
    """The failing module is a direct child: 'body.1'."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.body = nn.Sequential(nn.ReLU(), DataDependent())
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)))


class DeepBad(nn.Module):
    """The failing module is nested: 'blocks.1.inner'."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([Plain(), Gated(), Plain()])
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.fc(x)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, y):
        return self.lin(x) + y


class DefaultArgs(nn.Module):
    """Extra arguments with defaults: specialised, so the graph takes one tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x, mask=None, scale: float = 2.0, use_b: bool = True):
        x = self.a(x) * scale
        if mask is not None:
            x = x * mask
        return self.b(x) if use_b else x


@pytest.mark.parametrize("model_cls, path", [(ShallowBad, "body.1"), (DeepBad, "blocks.1.inner")])
def test_data_dependent_control_flow_names_module(model_cls, path):
    with pytest.raises(AugLocalError) as exc:
        trace(model_cls())
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"'{path}'" in msg
    assert "DataDependent" in msg


def test_data_dependent_error_reaches_build_plan():
    with pytest.raises(AugLocalError) as exc:
        build_plan(DeepBad(), 2, input_size=(8,))
    assert "'blocks.1.inner'" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_second_required_argument_rejected():
    with pytest.raises(AugLocalError) as exc:
        trace(TwoInputs())
    msg = str(exc.value)
    assert "\n" not in msg
    assert "'y'" in msg
    with pytest.raises(AugLocalError):
        analyze_model(TwoInputs(), (8,))


def test_default_arguments_specialised():
    model = DefaultArgs().eval()
    assert specialised_args(model) == {"mask": None, "scale": 2.0, "use_b": True}
    gm = trace(model)
    act = activation_nodes(gm.graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert all(not (set(p.users) & act) for p in placeholders[1:])
    x = torch.randn(3, 8)
    assert torch.equal(gm(x), model(x))


def test_trace_shares_parameters():
    model = DefaultArgs()
    gm = trace(model)
    assert {id(p) for p in gm.parameters()} == {id(p) for p in model.parameters()}


def test_vit_default_args_specialised(vit):
    gm = vit.analysis.gm
    act = activation_nodes(gm.graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[0] in act
    for p in placeholders[1:]:
        assert not (set(p.users) & act), (p.name, list(p.users))
    # attn_mask / is_causal never pin a value: cut points exist inside the transformer stack
    block_cuts = [n for n in vit.analysis.cuts
                  if any(k.startswith("blocks.") for k in n.meta.get("nn_module_stack", {}))]
    assert len(block_cuts) >= 11
