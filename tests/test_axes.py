"""Axes measured, not guessed (issue 25): every layout adapted along what its axes are, the audit
that checks it, inputs that are not float images."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from auglocal_fx import AugLocalError, export_onnx, to_auglocal
from auglocal_fx.assemble.adapters import Adapter, TokenPool, make_adapter
from auglocal_fx.assemble.axis_audit import audit_axes, audit_module
from auglocal_fx.passes.layouts import resolve_layout
from auglocal_fx.planner import analyze_model
from auglocal_fx.testing.hf_zoo import next_token_loss

from checks import assert_gradient_isolation, fixed_batch_losses
from handwritten import M5, ClassTokenNet, NHWCConvNet, ShuffleNet, TinyGPT, TokenMLP, VectorMLP, Video3d

warnings.filterwarnings("ignore", category=UserWarning)

# one hand-written model per layout: (model, input size, blocks, the layouts its cuts must hand on)
LAYOUTS = {
    "1-d maps (audio)": (lambda: M5(), (1, 8000), 4, {"ncl"}),
    "2-d maps, channel shuffle": (lambda: ShuffleNet(), (3, 32, 32), 4, {"nchw"}),
    "2-d maps, channels last": (lambda: NHWCConvNet(), (3, 32, 32), 4, {"nhwc", "nchw", "nc"}),
    "3-d maps (video)": (lambda: Video3d(), (3, 8, 16, 16), 5, {"ncdhw"}),
    "tokens": (lambda: TokenMLP(16, 4), (3, 32, 32), 5, {"ntc"}),
    "tokens with a class token": (lambda: ClassTokenNet(), (3, 32, 32), 4, {"ntc", "nc"}),
    "flat vectors": (lambda: VectorMLP(), (20,), 5, {"nc"}),
}


def _convert(model, blocks, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_auglocal(model, blocks, **kw)


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_layouts_are_measured_and_the_graph_agrees(kind):
    make, size, _, want = LAYOUTS[kind]
    a = analyze_model(make(), size)
    crossing = {a.axes.of(t) for span in a.layers for t in a.live.get(span.boundary, ()) if t.name in a.axes.layouts}
    assert crossing <= want, f"{kind}: {crossing}"
    assert "?" not in crossing and a.axes.disagreements == []


@pytest.mark.parametrize("rule", ["auglocal", "dgl"])
@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_every_layout_is_adapted_along_its_channels(kind, rule):
    make, size, blocks, _ = LAYOUTS[kind]
    torch.manual_seed(0)
    model = make()
    net = _convert(model, blocks, input_size=size, rule=rule, aux_depth=1, pyramid=0.0)
    checks = audit_axes(net)
    assert all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    assert len(checks) >= (len(net.aux) if rule == "dgl" else 0)
    x = torch.randn(3, *size)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert_gradient_isolation(net, x, torch.randint(0, 10, (3,)))


def test_the_plan_names_each_adapters_input_layout():
    net = _convert(M5(), 4, input_size=(1, 8000))
    adapters = [a for recipe in net.plan.aux for a in recipe.adapters]
    assert adapters and all(a.endswith("(ncl)") for a in adapters)
    convs = [m for aux in net.aux for m in aux.modules() if isinstance(m, Adapter)]
    assert all(isinstance(m, nn.Conv1d | nn.BatchNorm1d | nn.AdaptiveAvgPool1d) for a in convs for m in a)


def test_audio_aux_nets_hold_no_weight_over_time_at_any_length():
    aux_params = []
    for t in (16000, 48000):  # 3 s of 16 kHz audio: the adapters once grew with T (134x the backbone)
        model = M5()
        net = _convert(model, 4, input_size=(1, t))
        assert all(c.ok for c in audit_axes(net))
        backbone = sum(p.numel() for p in model.parameters())
        sizes = [sum(p.numel() for p in aux.parameters()) for aux in net.aux]
        assert max(sizes) < backbone, (sizes, backbone)
        aux_params.append(sizes)
    assert aux_params[0] == aux_params[1]  # nothing in an aux net depends on the length


def test_torchvision_shufflenet_has_no_adapter_over_image_rows():
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    net = _convert(model, 8, input_size=(3, 224, 224))
    checks = audit_axes(net)
    assert checks and all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    channels = {c for layer in net.plan.layers for shape in layer.bundle for c in shape[:1]}
    convs = [m for aux in net.aux for a in aux.modules() if isinstance(a, Adapter) for m in a
             if isinstance(m, nn.Conv2d)]
    assert convs and all(c.in_channels in channels and c.in_channels not in (28, 14, 7) for c in convs)


def test_the_audit_fails_on_a_weight_over_a_spatial_axis():
    over_time = Adapter("linear over time", nn.Linear(61, 30), TokenPool(32))  # what 1-d maps once got
    check = audit_module(over_time, [32, 61], "ncl", "old 1-d adapter")
    assert not check.ok and check.contracted == ["l"]
    rows = Adapter("conv over rows", nn.Conv2d(28, 14, 1))  # a channels-first map taken for channels-last
    check = audit_module(rows, [48, 28, 28], "nchw", "rows")
    assert not check.ok and "h" in check.contracted and "NOT the channel axis" in check.line()
    assert audit_module(nn.Conv2d(48, 16, 1), [48, 28, 28], "nchw", "ok").contracted == ["c"]


def test_a_tensor_of_unknown_layout_gets_no_adapter_but_one_line():
    with pytest.raises(AugLocalError, match="holds the channels") as info:
        make_adapter([8, 12, 12], [16, 6, 6], layouts=("?", "nchw"))
    assert "\n" not in str(info.value) and "layers=" in str(info.value) and "crossing_layouts" in str(info.value)


@pytest.mark.parametrize("shape, old, new", [([64], "", "nc"), ([17, 192], "", "ntc"), ([512, 4, 4], "", "nchw"),
                                             ([4, 4, 96], "nhwc", "nhwc"), ([32, 250], "ncl", "ncl")])
def test_plans_written_before_measured_layouts_read_as_they_were_meant(shape, old, new):
    assert resolve_layout(shape, old) == new


@pytest.mark.parametrize("src, dst, layouts, conv, out_shape", [
    ([16, 100], [32, 50], ("ncl", "ncl"), nn.Conv1d, (2, 32, 50)),  # 1-d: strided 1x1 conv over channels
    ([8, 4, 8, 8], [16, 2, 4, 4], ("ncdhw", "ncdhw"), nn.Conv3d, (2, 16, 2, 4, 4)),  # 3-d
    ([4, 8, 8, 8], [2, 4, 4, 16], ("ndhwc", "ndhwc"), nn.Conv3d, (2, 2, 4, 4, 16)),  # 3-d channels last
    ([16, 100], [30, 32], ("ncl", "ntc"), nn.Linear, (2, 30, 32)),  # a 1-d map into tokens
])
def test_adapters_for_every_layout(src, dst, layouts, conv, out_shape):
    adapter = make_adapter(src, dst, layouts=layouts)
    assert any(isinstance(m, conv) for m in adapter.modules())
    assert tuple(adapter.eval()(torch.randn(2, *src)).shape) == out_shape
    assert audit_module(adapter, src, layouts[0], "test").ok


# -- inputs that are not float images: a causal language model --------------------------------------
def test_a_causal_lm_converts_per_block_trains_and_exports(tmp_path):
    torch.manual_seed(0)
    model = TinyGPT()
    tokens = torch.randint(0, 64, (4, 32))
    targets = torch.roll(tokens, -1, dims=1)
    net = _convert(model, 7, example_inputs=tokens)
    c = net.plan.config
    assert (c.input_dtype, c.input_size, c.input_layout) == ("int64", [32], "nl")
    blocks = [net.plan.layers[b.layers[-1]].name for b in net.plan.blocks]
    assert [f"blocks.{i}" in name for i, name in enumerate(blocks[1:])] == [True] * 6  # one transformer block each
    assert net.plan.head.out_shape == [32, 64]  # per-token logits, and so are the aux nets'
    with torch.no_grad():
        assert torch.equal(net.eval()(tokens), model.eval()(tokens))
        assert net.aux[0](net.blocks[0](tokens)).shape == (4, 32, 64)
    assert_gradient_isolation(net, tokens, targets, loss_fn=next_token_loss)
    losses = fixed_batch_losses(net, tokens, targets, loss_fn=next_token_loss)
    assert losses[-1] < losses[0] - 0.5, losses
    report = export_onnx(net, tmp_path / "lm.onnx")
    assert report.max_abs_diff <= 1e-4


@pytest.mark.parametrize("kwargs, message", [
    ({"example_inputs": (torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8))}, "takes 1 positional"),
    ({"example_inputs": ()}, "holds no input"),
    ({"example_inputs": torch.zeros(1, 8, dtype=torch.long), "input_size": (8,)}, "not both"),
    ({"example_inputs": torch.zeros(8, dtype=torch.long)}, "batch axis"),
])
def test_example_inputs_mistakes_are_one_line(kwargs, message):
    with pytest.raises(AugLocalError, match=message) as info:
        to_auglocal(TinyGPT(), 4, **kwargs)
    assert "\n" not in str(info.value)


def test_the_graph_reading_tells_a_window_partition_from_a_channel_shuffle():
    from auglocal_fx.passes.layouts import _reshaped  # the fallback's rule for reshapes, on its own

    assert _reshaped((1, 7, 7, 768), (1, 1, 7, 1, 7, 768)) == "last"  # Swin V2 windows as wide as the map
    assert _reshaped((1, 24, 8, 8), (1, 2, 12, 8, 8)) == "first"  # ShuffleNet's view(b, g, c/g, h, w)


class FlatHead(nn.Module):
    """A CNN whose map is flattened into a large classifier (``view(N, -1)``, as older code does)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.ReLU())
                                      for i in range(4)])
        self.fc = nn.Sequential(nn.Linear(8 * 16 * 16, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.fc(self.blocks(x).view(x.shape[0], -1))


def test_a_flattened_map_is_read_as_features_not_a_sequence():
    net = _convert(FlatHead(), 4, input_size=(3, 16, 16))  # the heavy head: aux nets get light heads
    assert all(c.ok for c in audit_axes(net))
    assert "?" not in {lay for layer in net.plan.layers for lay in layer.crossing_layouts}


def test_an_unknown_layout_names_the_aux_net_and_the_layer():
    from auglocal_fx import build_plan

    plan = build_plan(M5(), 4, input_size=(1, 8000))
    plan.layers[0].crossing_layouts = ["?"]  # as if neither measuring nor the graph could tell
    with pytest.raises(AugLocalError, match=r"aux net of block 0, from layer 'stages.0'") as info:
        to_auglocal(M5(), plan=plan)
    assert "\n" not in str(info.value) and "crossing_layouts" in str(info.value)


def test_maps_of_another_rank_are_adapted_through_their_flattened_positions():
    adapter = make_adapter([16, 32, 32], [128, 49], layouts=("nchw", "ncl"))  # EfficientViM's (C, H*W) state
    assert tuple(adapter.eval()(torch.randn(2, 16, 32, 32)).shape) == (2, 128, 49)
    assert audit_module(adapter, [16, 32, 32], "nchw", "flatten").ok
    back = make_adapter([128, 49], [64, 7, 7], layouts=("ncl", "nchw"))
    assert tuple(back.eval()(torch.randn(2, 128, 49)).shape) == (2, 64, 7, 7)
