"""Models written the way people write PyTorch, and torchvision's: they split per block, their
aux nets act on the right axes, their outputs and mistakes are handled (issue 16)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from auglocal_fx import AugLocalError, build_plan, to_auglocal
from auglocal_fx.assemble.adapters import make_adapter
from auglocal_fx.passes.layouts import CHANNELS_LAST
from auglocal_fx.planner import analyze_model

from checks import assert_gradient_isolation

warnings.filterwarnings("ignore", category=UserWarning)


def _convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_auglocal(model, **kw)


def _parity_and_step(net, model, size, classes=10):
    x = torch.randn(3, *size)
    with torch.no_grad():
        ref, out = model.eval()(x), net.eval()(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    y = torch.randint(0, classes, (3,))
    step = net.train().training_step(x, y)
    assert all(np.isfinite([step.loss, *step.local_losses]))
    return x, y


# -- transformers written with torch.nn ----------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, layers=4, norm_first=False):
        super().__init__()
        self.emb = nn.Linear(16, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.enc(self.emb(x)).mean(1))


class PreNormMLPs(nn.Module):
    """Blocks as Sequential(LayerNorm, Linear, GELU, Linear), the residual add in the parent's loop."""

    def __init__(self, depth=6, d=32):
        super().__init__()
        self.emb = nn.Linear(16, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(depth))
        self.fc = nn.Linear(d, 10)

    def forward(self, x):
        x = self.emb(x)
        for block in self.blocks:
            x = x + block(x)
        return self.fc(x.mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_splits_per_layer(norm_first):
    torch.manual_seed(0)
    model = Encoder(norm_first=norm_first)
    plan = build_plan(model, 4, input_size=(8, 16))
    assert [layer.name for layer in plan.layers][-4:] == [f"enc.layers.{i}" for i in range(4)]
    net = _convert(model, blocks=4, input_size=(8, 16))
    x, y = _parity_and_step(net, model, (8, 16))
    assert_gradient_isolation(net, x, y)


def test_module_list_of_sequential_blocks_is_one_layer_per_block():
    torch.manual_seed(0)
    model = PreNormMLPs()
    plan = build_plan(model, 3, input_size=(8, 16))
    assert [layer.name for layer in plan.layers] == ["emb"] + [f"blocks.{i}" for i in range(6)]
    net = _convert(model, blocks=3, input_size=(8, 16))
    x, y = _parity_and_step(net, model, (8, 16))
    assert_gradient_isolation(net, x, y)


def test_torchvision_vit_splits_per_encoder_block():
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    a = analyze_model(model, (3, 32, 32))
    blocks = [s.name for s in a.layers if "encoder_layer_" in s.name]
    assert len(a.layers) >= 12 and len(blocks) == 12


# -- torchvision classifier heads -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["vgg11_bn", "alexnet", "mobilenet_v3_small"])
def test_classifier_mlp_is_the_head(name):
    """The hidden Linears of torchvision's classifier Sequential are the head, not layers."""
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    a = analyze_model(model, (3, 64, 64))
    assert not any(s.name.startswith("classifier") for s in a.layers[:-1])
    assert len(a.layers[-1].boundary.meta["shape"]) in (2, 4)  # a map, or the map just flattened
    head_modules = {n.target for n in a.head.nodes if n.op == "call_module"}
    assert any(t.startswith("classifier") for t in head_modules) and sum(
        isinstance(model.get_submodule(t), nn.Linear) for t in head_modules) >= 2


def test_mobilenet_v3_converts_and_trains():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    net = _convert(model, blocks=4, input_size=(3, 64, 64))
    _parity_and_step(net, model, (3, 64, 64))


# -- the layers= escape hatch -----------------------------------------------------------------------
def test_layers_patterns_name_the_layers():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    net = _convert(model, blocks=3, input_size=(3, 64, 64), layers=["conv1", "layer*"])
    assert [layer.name for layer in net.plan.layers] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert net.plan.config.layers == ["conv1", "layer*"]
    _parity_and_step(net, model, (3, 64, 64))


@pytest.mark.parametrize("layers, message", [
    (["nope.*"], "layers='nope.*' matches no module of ResNet"),
    ("layer1", "is not a list of module-path patterns"),
    (["layer1.0.conv1", "layer1.0.conv2"], "names a layer boundary without a valid cut"),
])
def test_layers_patterns_errors(layers, message):
    model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(AugLocalError, match=message) as info:
        build_plan(model, 2, input_size=(3, 64, 64), layers=layers, max_bundle=1)
    assert "\n" not in str(info.value)


# -- layouts: adapters act on the channel axis --------------------------------------------------------
def _weighted(adapter):
    return next(m for m in adapter.modules() if isinstance(m, nn.Conv2d | nn.Linear))


@pytest.mark.parametrize("src, dst, layouts, in_width, out_shape", [
    ([8, 12, 12], [16, 6, 6], ("", ""), 8, (2, 16, 6, 6)),  # NCHW: conv over the 8 channels
    ([12, 12, 8], [6, 6, 16], (CHANNELS_LAST, CHANNELS_LAST), 8, (2, 6, 6, 16)),  # NHWC: still the 8 channels
    ([12, 12, 8], [16, 6, 6], (CHANNELS_LAST, ""), 8, (2, 16, 6, 6)),
    ([10, 8], [5, 16], ("", ""), 8, (2, 5, 16)),  # tokens: linear over the 8 features
    ([12, 12, 8], [10], (CHANNELS_LAST, ""), 8, (2, 10)),  # NHWC map -> vector: pool, then project
])
def test_adapters_act_on_the_channel_axis(src, dst, layouts, in_width, out_shape):
    adapter = make_adapter(src, dst, layouts=layouts)
    layer = _weighted(adapter)
    assert (layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features) == in_width
    assert tuple(adapter.eval()(torch.randn(2, *src)).shape) == out_shape


class ChannelsLastNet(nn.Module):
    """Swin-style: maps kept as (N, H, W, C) between blocks, LayerNorm/Linear over C, merging by reshape."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for d in (16, 16, 64, 64))
        self.merge = nn.Linear(64, 64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)  # N, H, W, C
        for i, block in enumerate(self.blocks):
            if i == 2:  # patch merging: 2x2 neighbours into channels
                n, h, w, c = x.shape
                x = self.merge(x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h // 2, w // 2, 4 * c))
            x = x + block(x)
        return self.fc(x.mean((1, 2)))


def test_channels_last_maps_are_adapted_along_channels():
    torch.manual_seed(0)
    model = ChannelsLastNet()
    net = _convert(model, blocks=4, input_size=(3, 32, 32), aux_depth=1, pyramid=0.0)
    assert all(lay.crossing_layouts == [CHANNELS_LAST] for lay in net.plan.layers)
    adapters = [a for recipe in net.plan.aux for a in recipe.adapters]
    assert adapters and all("(nhwc)" in a for a in adapters)
    convs = [m for aux in net.aux for m in aux.modules() if isinstance(m, nn.Conv2d)]
    assert convs and {c.in_channels for c in convs} <= {16, 64}  # channels, never image rows (8 or 4)
    x, y = _parity_and_step(net, model, (3, 32, 32))
    assert_gradient_isolation(net, x, y)


def test_torchvision_swin_adapters_use_channels():
    model = torchvision.models.swin_t(num_classes=10)
    net = _convert(model, blocks=4, input_size=(3, 64, 64))
    assert any("(nhwc)" in a for recipe in net.plan.aux for a in recipe.adapters)
    y = torch.randint(0, 10, (2,))
    net.train().training_step(torch.randn(2, 3, 64, 64), y)
    net.training_step(torch.randn(2, 3, 96, 96), y)  # another size: the adapters scale with the backbone


def test_another_input_size_is_checked_before_the_first_step():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    net = _convert(model, blocks=3, input_size=(3, 32, 32))
    with pytest.raises(AugLocalError, match=r"planned for input 3x32x32 and cannot run at 3x64x64") as info:
        net.training_step(torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,)))
    assert "\n" not in str(info.value)


# -- outputs that are not a bare tensor --------------------------------------------------------------
@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    features: torch.Tensor


class ManyOutputs(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        f = self.c3(self.c2(self.c1(x).relu()).relu()).mean((2, 3))
        logits = self.fc(f)
        if self.kind == "dict":
            return {"features": f, "logits": logits}
        return (logits, f) if self.kind == "tuple" else Out(logits, f)


@pytest.mark.parametrize("kind, pick", [("dict", "logits"), ("tuple", 0), ("dataclass", "logits")])
def test_dict_tuple_dataclass_outputs(kind, pick):
    torch.manual_seed(0)
    model = ManyOutputs(kind)
    with pytest.warns(UserWarning, match="returns several values"):
        net = to_auglocal(model, blocks=2, input_size=(3, 16, 16))
    assert net.plan.config.output == pick
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model.eval()(x)
        ref = ref[pick] if kind != "dataclass" else ref.logits
        torch.testing.assert_close(net.eval()(x), ref)
    net.train().training_step(x, torch.randint(0, 10, (2,)))
    chosen = _convert(ManyOutputs(kind), blocks=2, input_size=(3, 16, 16),
                      output={"dict": "features", "tuple": 1, "dataclass": "features"}[kind])
    assert chosen.plan.head.out_shape == [8]
    with pytest.raises(AugLocalError, match="output='nope' is not in"):
        to_auglocal(ManyOutputs(kind), blocks=2, input_size=(3, 16, 16), output="nope")


def test_aux_logits_models_say_how_to_build_them():
    model = torchvision.models.googlenet(weights=None, num_classes=10, init_weights=True)
    with pytest.raises(AugLocalError, match=r"googlenet\(aux_logits=False"):
        to_auglocal(model, blocks=4, input_size=(3, 64, 64))


# -- silent wrong results are errors --------------------------------------------------------------------
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.c2, self.c3 = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x, scale=None):
        return self.fc(self.c3(self.c2(self.b1(self.c1(x)).relu()).relu()).mean((2, 3)))


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 5}, "num_classes=5 differs from the 10 outputs Small gives"),
    ({"blocks": True}, "blocks=True is not a number of blocks"),
    ({"input_size": (3, 16.0, 16)}, "is not a shape"),
])
def test_wrong_arguments_are_one_line_errors(kwargs, message):
    args = {"blocks": 2, "input_size": (3, 16, 16), **kwargs}
    with pytest.raises(AugLocalError, match=message) as info:
        to_auglocal(Small(), **args)
    assert "\n" not in str(info.value)


def test_numpy_sizes_are_accepted():
    net = _convert(Small(), blocks=np.int64(2), input_size=(np.int64(3), np.int64(16), 16))
    assert net.plan.config.input_size == [3, 16, 16] and len(net.blocks) == 2


def test_converting_an_eval_mode_model_trains_its_batch_norm():
    model = Small().eval()
    net = _convert(model, blocks=2, input_size=(3, 16, 16)).train()
    before = model.b1.running_mean.clone()
    net.training_step(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    assert all(m.training for m in net.modules())
    assert not torch.equal(before, model.b1.running_mean)


def test_tensor_default_argument_is_a_one_line_error():
    class TensorDefault(Small):
        def forward(self, x, w=torch.ones(2)):  # noqa: B008 - the mistake under test
            return super().forward(x)

    with pytest.raises(AugLocalError, match="'w' has a tensor default"):
        to_auglocal(TensorDefault(), blocks=2, input_size=(3, 16, 16))
