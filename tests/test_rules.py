"""The baselines' rules as the reference code builds them (DGL, InfoPro, PredSim): structure and aux
FLOPs on CIFAR ResNet-32 against the reference's construction counted by hand, their own local
losses (InfoPro against the un-normalised image, PredSim's similarity matrices), gradient isolation,
eval parity and a training step on a CNN, a ViT and a channels-last net, save/load."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from auglocal_fx import AugLocalError, load_auglocal, to_auglocal
from auglocal_fx.models import create_model
from auglocal_fx.rules import IMAGENET_MEAN, IMAGENET_STD, RULES, infopro, predsim

from checks import assert_gradient_isolation
from handwritten import cifar_resnet

LOSS_RULES = ["dgl", "infopro", "predsim"]


def _convert(model, blocks, size, rule, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_auglocal(model, blocks, rule=rule, input_size=size, **kw)


# -- the reference's construction on ResNet-32, K=16, counted by hand (MACs per sample) -----------------
# (channels, side) of the 15 aux nets' inputs: stem + layer1 (6), layer2 (5), layer3[0..3] (4)
R32_POINTS = [(16, 32)] * 6 + [(32, 16)] * 5 + [(64, 8)] * 4
INFOPRO_CONV = {16: (32, 2), 32: (64, 2), 64: (64, 1)}  # reference: classifier conv width, stride per stage
PREDSIM_KERNEL = {16: (8, 4), 32: (4, 4), 64: (4, 2)}  # reference get_pool_layer(C, S, 512) kernels


def _dgl_macs(c, s, classes=10):
    p = math.ceil(s / 4)
    f = c * min(p, 2) ** 2
    return 3 * c * c * p * p + 2 * f * f + f * classes  # three 1x1 convs, two Linear(F, F), Linear(F, classes)


def _infopro_macs(c, s, classes=10, image=32):
    w, stride = INFOPRO_CONV[c]
    classifier = c * w * 9 * (s // stride) ** 2 + w * 128 + 128 * classes
    decoder = (c * 12 + 12 * 3) * 9 * image * image  # two 3x3 convs at the image's size
    return classifier + decoder


def _predsim_macs(c, s, classes=10):
    kh, kw = PREDSIM_KERNEL[c]
    return c * c * 9 * s * s + c * (s // kh) * (s // kw) * classes  # sim conv, pred linear


REFERENCE_MACS = {"dgl": _dgl_macs, "infopro": _infopro_macs, "predsim": _predsim_macs}


@pytest.fixture(scope="module")
def resnet32():
    nets = {}
    for rule in LOSS_RULES:
        torch.manual_seed(0)
        nets[rule] = _convert(create_model("resnet32_cifar", num_classes=10), 16, (3, 32, 32), rule)
    return nets


@pytest.mark.parametrize("rule", LOSS_RULES)
def test_aux_flops_on_resnet32_match_the_reference_construction(resnet32, rule):
    plan = resnet32[rule].plan
    assert [plan.layers[plan.blocks[a.block].layers[-1]].out_shape for a in plan.aux] == \
        [[c, s, s] for c, s in R32_POINTS]
    ours = [a.flops / 2 for a in plan.aux]  # the FLOP counter counts a multiply-add as 2
    ref = [REFERENCE_MACS[rule](c, s) for c, s in R32_POINTS]
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o == pytest.approx(r, rel=0.1), f"aux net {i}"
    backbone = (sum(layer.flops for layer in plan.layers) + plan.head.flops) / 2
    assert backbone == pytest.approx(69.1e6, rel=0.01)
    assert sum(ours) / backbone == pytest.approx(sum(ref) / backbone, rel=0.1)
    if rule == "dgl":
        assert 0.015 < sum(ours) / backbone < 0.03  # the reference's DGL is about 0.02x the backbone


def test_dgl_structure(resnet32):
    aux = resnet32["dgl"].aux
    kinds = [type(m).__name__ for m in aux[0]]
    assert kinds == ["AdaptiveAvgPool2d"] + ["Conv2d", "BatchNorm2d", "ReLU"] * 3 + ["AdaptiveAvgPool2d", "Flatten"] + \
        ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    for net, c, first in ((aux[0], 16, 8), (aux[6], 32, 4), (aux[14], 64, 2)):
        assert net[0].output_size == (first, first) and net[10].output_size == (2, 2)
        convs = [m for m in net if isinstance(m, nn.Conv2d)]
        assert all((m.in_channels, m.out_channels, m.kernel_size, m.bias) == (c, c, (1, 1), None) for m in convs)
        linears = [m for m in net if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features, m.bias is None) for m in linears] == \
            [(4 * c, 4 * c, True), (4 * c, 4 * c, True), (4 * c, 10, False)]
    assert resnet32["dgl"].aux_losses is not None and len(resnet32["dgl"].aux_losses) == 0  # plain cross-entropy


def test_infopro_structure(resnet32):
    aux = resnet32["infopro"].aux
    for net, c in ((aux[0], 16), (aux[6], 32), (aux[14], 64)):
        w, stride = INFOPRO_CONV[c]
        conv, linears = net.classifier[0], [m for m in net.classifier if isinstance(m, nn.Linear)]
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.bias) == \
            (c, w, (3, 3), (stride, stride), None)
        assert [(m.in_features, m.out_features) for m in linears] == [(w, 128), (128, 10)]
        up, c1, norm, _, c2 = net.decoder
        assert up.size == (32, 32) and up.mode == "bilinear" and up.align_corners
        assert (c1.in_channels, c1.out_channels, c1.kernel_size, c1.bias is not None) == (c, 12, (3, 3), True)
        assert isinstance(norm, nn.BatchNorm2d) and (c2.in_channels, c2.out_channels) == (12, 3)


def test_predsim_structure(resnet32):
    aux = resnet32["predsim"].aux
    grids = [net.pred[0].output_size for net in aux]
    assert grids == [(4, 8)] * 6 + [(4, 4)] * 5 + [(2, 4)] * 4  # the reference's pooled maps, 512 features each
    assert all(net.pred[2].in_features == 512 and net.pred[2].out_features == 10 for net in aux)
    assert all((net.sim.in_channels, net.sim.out_channels, net.sim.kernel_size, net.sim.bias) == (c, c, (3, 3), None)
               for net, (c, _) in zip(aux, R32_POINTS))
    assert predsim.pool_grid(2048, 7, 7) == (1, 1)  # wider than 512 features: a global pool


def test_loss_weights_interpolate_over_the_aux_nets(resnet32):
    losses = resnet32["infopro"].aux_losses
    assert len(losses) == 15
    for i, loss in enumerate(losses):
        r = i / 14
        assert loss.rec_weight == pytest.approx(5 * (1 - r) + 0.2 * r)
        assert loss.cls_weight == pytest.approx(0.05 * (1 - r) + 0.5 * r)
    assert (losses[1].rec_weight, losses[1].cls_weight) == pytest.approx((4.657, 0.0821), abs=1e-3)  # reference module 1
    assert (losses[-1].rec_weight, losses[-1].cls_weight) == pytest.approx((0.2, 0.5))
    assert infopro.interpolate(0, 1, (5.0, 0.2)) == 5.0  # one aux net: the first weight
    assert all((loss.sim_weight, loss.pred_weight) == (0.99, 0.01) for loss in resnet32["predsim"].aux_losses)


# -- the losses themselves -----------------------------------------------------------------------------
def test_predsim_similarity_matrices_by_hand():
    y = torch.tensor([0, 1, 0, 2])
    expected = torch.tensor([[1, -0.5, 1, -0.5], [-0.5, 1, -0.5, -0.5], [1, -0.5, 1, -0.5], [-0.5, -0.5, -0.5, 1]])
    torch.testing.assert_close(predsim.similarity_matrix(F.one_hot(y, 3).float()), expected, rtol=0, atol=1e-6)
    # a map: per-channel std over 2 positions; sample 0's stds rise 1..4, sample 1's fall: centred, they are opposite
    rise = torch.tensor([1.0, 2, 3, 4]) * math.sqrt(2)
    h = torch.stack([torch.stack([torch.zeros(4), rise], 1), torch.stack([torch.zeros(4), rise.flip(0)], 1)])
    h = h.view(2, 4, 2, 1)
    torch.testing.assert_close(predsim.similarity_matrix(h), torch.tensor([[1.0, -1], [-1, 1]]), rtol=0, atol=1e-6)
    loss = predsim.PredSimLoss()
    logits, target = torch.zeros(2, 3), torch.tensor([0, 0])  # same class: label matrix all ones
    value, out = loss((logits, h), target, None, F.cross_entropy)
    assert out is logits
    assert value.item() == pytest.approx(0.99 * (2 * 2**2 / 4) + 0.01 * math.log(3), rel=1e-6)


def test_infopro_loss_compares_with_the_unnormalised_image():
    torch.manual_seed(0)
    net = _convert(cifar_resnet(1), 4, (3, 16, 16), "infopro")
    mean, std = (0.2, 0.4, 0.6), (0.1, 0.2, 0.3)
    net.image_stats = (mean, std)
    img = torch.rand(4, 3, 16, 16)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x, y = (img - m) / s, torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(net.aux_losses[0].restore(x), img)
    state = copy.deepcopy(net.state_dict())
    out = net.train().training_step(x, y)
    net.load_state_dict(state)
    with torch.no_grad():
        logits, dec = net.aux[0](net.blocks[0](x))
    loss = net.aux_losses[0]
    # the reference: sigmoid, nn.BCELoss against the restored image; weights of aux net 0 of 3
    expected = 5.0 * F.binary_cross_entropy(torch.sigmoid(dec), img) + 0.05 * F.cross_entropy(logits, y)
    assert (loss.rec_weight, loss.cls_weight) == (5.0, 0.05)
    assert out.local_losses[0] == pytest.approx(expected.item(), rel=1e-5)


def test_image_stats_default_to_the_models_then_imagenets():
    cifar = _convert(create_model("resnet32_cifar", num_classes=10), 4, (3, 32, 32), "infopro")
    assert cifar.image_stats[0] == pytest.approx(tuple(create_model("resnet32_cifar").pretrained_cfg["mean"]))
    plain = _convert(cifar_resnet(1), 4, (3, 16, 16), "infopro")
    assert plain.image_stats == (IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(plain.aux_losses[0].mean.flatten(), torch.tensor(IMAGENET_MEAN))


# -- training, invariants, checkpoints, for every rule ---------------------------------------------------
class ChannelsLastNet(nn.Module):
    """Maps kept as (N, H, W, C) between blocks (Swin-style), LayerNorm/Linear over C."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
                                    for _ in range(3))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        for block in self.blocks:
            x = x + block(x)
        return self.fc(x.mean((1, 2)))


MODELS = {
    "cnn": (lambda: cifar_resnet(1), 4, (3, 16, 16)),
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10), 4, (3, 32, 32)),
    "channels_last": (ChannelsLastNet, 3, (3, 16, 16)),
}


def _net(name, rule):
    factory, k, size = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    return model, _convert(model, k, size, rule)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("rule", LOSS_RULES)
def test_parity_step_and_isolation(rule, name):
    model, net = _net(name, rule)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, *net.plan.config.input_size, generator=g), torch.tensor([0, 1, 1, 3])
    model.eval(), net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        outs = net.head_outputs(x)
    assert [tuple(o.shape) for o in outs] == [(4, 10)] * len(net.blocks)  # logits, also of aux nets with decoders
    out = net.train().training_step(x, y)
    assert len(out.local_losses) == len(net.blocks) - 1 and all(math.isfinite(v) for v in out.local_losses)
    assert all(p.grad is not None for p in net.parameters())
    if name == "channels_last":
        convs = [m for aux in net.aux for m in aux.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.in_channels in (16, 32, 12) for c in convs)  # channels (decoder: 12), never image rows (4)
    assert_gradient_isolation(net, x, y)


@pytest.mark.parametrize("rule", LOSS_RULES)
def test_save_load_keeps_weights_and_image_stats(tmp_path, rule):
    _, net = _net("cnn", rule)
    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    net.image_stats = stats
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    net.train().training_step(x, y)
    keys = set(net.state_dict())
    assert not any("aux_losses" in k for k in keys)  # losses are parameter-free: no state-dict keys
    net.save(tmp_path / "net.pt")
    net2 = load_auglocal(tmp_path / "net.pt", model=cifar_resnet(1))
    assert set(net2.state_dict()) == keys and net2.image_stats == stats
    if rule == "infopro":
        torch.testing.assert_close(net2.aux_losses[0].std.flatten(), torch.tensor(stats[1]))
    net.eval(), net2.eval()
    with torch.no_grad():
        for a, b in zip(net.head_outputs(x), net2.head_outputs(x)):
            assert torch.equal(a, b)
    assert net2.train().training_step(x, y).local_losses == pytest.approx(net.train().training_step(x, y).local_losses)


@pytest.mark.parametrize("rule", ["infopro", "predsim"])
def test_scaler_autocast_wrapped_units_and_per_unit_steps(rule):
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    _, a = _net("cnn", rule)
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    ref = a.train().training_step(x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaled = b.train().training_step(x, y, scaler=scaler)  # losses reported unscaled, gradients scaled
    assert scaled.local_losses == pytest.approx(ref.local_losses, rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q.grad / 2.0**8, p.grad)

    class Wrapped(nn.Module):  # what DistributedDataParallel looks like to the step: the unit is .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *h):
            return self.module(*h)

    wrapped = c.train().training_step(x, y, units=[Wrapped(u) for u in c.local_units()])
    assert wrapped.local_losses == pytest.approx(ref.local_losses, rel=1e-6)
    bf16 = copy.deepcopy(a).train().training_step(x, y, autocast_dtype=torch.bfloat16)
    assert all(math.isfinite(v) for v in bf16.local_losses)
    opt = torch.optim.SGD(c.parameters(), lr=0.1)
    c.zero_grad(set_to_none=True)
    c.training_step(x, y, optimizer=opt)
    assert all(p.grad is None for p in c.parameters())


@pytest.mark.parametrize("rule", ["infopro", "predsim"])
def test_memory_options_work_with_tuple_outputs(rule):
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    ref = _convert(cifar_resnet(1), 4, (3, 16, 16), rule).train().training_step(x, y)
    torch.manual_seed(0)
    net = _convert(cifar_resnet(1), 4, (3, 16, 16), rule, recompute="block")
    assert net.train().training_step(x, y).local_losses == pytest.approx(ref.local_losses, rel=1e-5)
    net = _convert(cifar_resnet(1), 4, (3, 16, 16), rule, aux_dtype="bfloat16")
    assert all(math.isfinite(v) for v in net.train().training_step(x, y).local_losses)
    with torch.no_grad():
        assert all(o.dtype == torch.float32 for o in net.eval().head_outputs(x))  # tuples handed on in float32


def test_shapes_a_rule_cannot_handle_are_one_line_errors():
    mlp = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(AugLocalError, match=r"^the infopro rule reconstructs an image.*use rule='dgl'") as info:
        _convert(mlp, 2, (20,), "infopro")
    assert "\n" not in str(info.value)
    for rule in ("dgl", "predsim"):  # features: an MLP head of their own
        net = _convert(copy.deepcopy(mlp), 2, (20,), rule)
        assert math.isfinite(net.train().training_step(torch.randn(4, 20), torch.tensor([0, 1, 2, 3])).loss)


def test_rules_bring_their_own_loss_or_none():
    assert [r for r in RULES if RULES[r].build_loss is not None] == ["infopro", "predsim"]
