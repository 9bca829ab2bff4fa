"""Tracing: clear one-line errors for untraceable models, specialised default arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from auglocal_fx import AugLocalError, build_plan
from auglocal_fx.passes.cuts import activation_nodes
from auglocal_fx.passes.trace import specialised_args, trace
from auglocal_fx.planner import analyze_model


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


class ViTForImageClassification(nn.Module):
    """Stands in for Hugging Face's class (no transformers install): fx fails on its forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent, as fx meets in transformers v5 models
            x = x * 2
        return self.lin(x)


ViTForImageClassification.__module__ = "transformers.models.vit.modeling_vit"


class WrapsTransformers(nn.Module):
    """A plain model around a transformers module: the failing module's class is what counts."""

    def __init__(self):
        super().__init__()
        self.backbone = ViTForImageClassification()

    def forward(self, x):
        return self.backbone(x)


class RootBranch(nn.Module):
    """Branches in the model's own forward: there is no submodule to keep whole."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        x = self.lin(x)
        if x.mean() > 0:
            x = -x
        return x


class IteratesTensor(nn.Module):
    """A loop over a traced tensor: control flow too (fx: Proxy object cannot be iterated)."""

    def forward(self, x):
        return torch.stack([row * 2 for row in x])


class Looper(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.body = IteratesTensor()

    def forward(self, x):
        return self.body(self.stem(x))


class IntOfTensor(nn.Module):
    """Not control flow: ``int`` of a traced value (a TypeError from fx)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)[:, : int(x.sum())]


def _trace_error(model: nn.Module) -> str:
    with pytest.raises(AugLocalError) as exc:
        trace(model)
    msg = str(exc.value)
    assert "\n" not in msg
    assert exc.value.__cause__ is not None
    return msg


@pytest.mark.parametrize("model_cls", [ViTForImageClassification, WrapsTransformers])
def test_transformers_model_gets_the_export_hint(model_cls):
    msg = _trace_error(model_cls())
    assert msg.startswith(f"torch.fx cannot trace {model_cls.__name__}: it is a Hugging Face transformers model "
                          "(ViTForImageClassification)")
    assert "v5 dropped transformers.utils.fx" in msg
    assert "frontend='export'" in msg  # what fx cannot trace, the export front end may
    assert "register_notrace_module" not in msg  # does not apply to them


def test_control_flow_names_module_line_and_node():
    msg = _trace_error(DeepBad())
    assert ("module 'blocks.1.inner' (DataDependent) uses a traced tensor in Python control flow "
            "(test_trace.py:22 `if x.sum() > 0:`, node 'gt')") in msg
    assert "timm.layers.register_notrace_module(DataDependent)" in msg
    assert "layers=" in msg and "torch.where" in msg
    assert "symbolically traced variables cannot be used as inputs to control flow" in msg  # fx's words, last


def test_control_flow_in_the_root_forward_says_to_rewrite_it():
    msg = _trace_error(RootBranch())
    assert "module '<root>' (RootBranch) uses a traced tensor in Python control flow" in msg
    assert "`if x.mean() > 0:`" in msg
    assert "register_notrace_module" not in msg  # the model cannot be a leaf of itself
    assert "rewrite that code without data-dependent control flow" in msg


def test_iterating_a_traced_tensor_is_control_flow():
    msg = _trace_error(Looper())
    assert "module 'body' (IteratesTensor) uses a traced tensor in Python control flow" in msg
    assert "register_notrace_module(IteratesTensor)" in msg


def test_other_trace_failures_keep_the_leaf_hint():
    msg = _trace_error(IntOfTensor())
    assert "in Python control flow" not in msg and "transformers" not in msg
    assert "Hint: register that module class with timm.layers.register_notrace_module" in msg


def test_leaf_hint_works():
    """What the control-flow hint says to do lets the model convert (a fresh class: the registry is global)."""
    import timm.layers

    class Branchy(DataDependent):
        pass

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(8, 8)
            self.blocks = nn.ModuleList([Plain(), Branchy(), Plain()])
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = self.stem(x)
            for b in self.blocks:
                x = b(x)
            return self.fc(x)

    assert "register_notrace_module(Branchy)" in _trace_error(Holder())
    timm.layers.register_notrace_module(Branchy)
    assert [layer.name for layer in build_plan(Holder(), 2, input_size=(8,)).layers] == \
        ["stem", "blocks.0", "blocks.1", "blocks.2"]
