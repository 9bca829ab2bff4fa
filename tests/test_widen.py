"""Widened copies (adapters="widen", the default): a copied layer that would see another shape takes
the aux net's tensor through rebuilt convolutions, as the reference builds its aux nets."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from auglocal_fx import Plan, to_auglocal
from auglocal_fx.assemble.adapters import Adapter
from auglocal_fx.assemble.widen import WidenedCopy
from auglocal_fx.aux_costs import aux_params
from auglocal_fx.runtime.bundles import call
from auglocal_fx.runtime.memory import SavedTensorMeter


class Block(nn.Module):
    """A basic residual block; with ``stride`` 2 it doubles the width behind a 1x1 conv shortcut."""

    def __init__(self, c: int, stride: int = 1):
        super().__init__()
        out = c * stride
        self.conv1 = nn.Conv2d(c, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.short = nn.Sequential(nn.Conv2d(c, out, 1, stride, bias=False), nn.BatchNorm2d(out)) if stride > 1 else None

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.short is None else self.short(x)))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8), Block(8, 2), Block(16, 2), Block(32), Block(32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


SIZE = (3, 16, 16)


def _widened(net) -> list[WidenedCopy]:
    return [m for aux in net.aux for m in aux.modules() if isinstance(m, WidenedCopy)]


def _tiny_net(**kw):
    torch.manual_seed(0)
    return to_auglocal(TinyResNet(), 5, aux_depth=2, pyramid=0, input_size=SIZE, **kw)


def test_a_widened_copy_is_the_block_built_from_the_aux_nets_width():
    """Hand-computed: the copy's conv1 reads the 16-channel map at stride 2, its shortcut the adapter."""
    net = _tiny_net().eval()
    widened = _widened(net)
    identity = [w for w in widened if w.layer == 4]  # blocks.3: an identity shortcut, fed 16x8x8 from block 1
    assert identity and identity[0].summary == "widen/2+1x1->32x4x4"
    w = identity[0]
    g = w.train_graph
    conv1 = g.get_submodule("blocks.3.conv1")
    assert (conv1.in_channels, conv1.out_channels, conv1.stride) == (16, 32, (2, 2))
    adapter = g.get_submodule("widen_adapter")
    assert isinstance(adapter, Adapter) and adapter[0].stride == (2, 2) and adapter[0].in_channels == 16
    x = torch.randn(2, 16, 8, 8)
    bn1, conv2, bn2 = (g.get_submodule(f"blocks.3.{n}") for n in ("bn1", "conv2", "bn2"))
    expected = F.relu(bn2(conv2(F.relu(bn1(conv1(x))))) + adapter(x))
    torch.testing.assert_close(w(x), expected, rtol=0, atol=0)
    assert not any(p is q for p in w.parameters() for q in net.model.parameters())  # the aux net's own


def test_a_copy_that_reads_its_input_only_through_convs_keeps_no_adapter():
    net = _tiny_net()
    down = [w for w in _widened(net) if w.layer == 3]  # blocks.2, fed 8x16x16: conv1 and the conv shortcut read x
    assert [w.summary for w in down] == ["widen/2->16x8x8"]
    g = down[0].train_graph
    convs = g.get_submodule("blocks.2.conv1"), g.get_submodule("blocks.2.short.0")
    assert [(m.in_channels, m.out_channels, m.stride) for m in convs] == [(8, 32, (4, 4))] * 2
    assert not any(isinstance(m, Adapter) for m in down[0].modules())


def test_the_plan_records_what_the_built_aux_nets_hold_and_compute():
    """Parameters counted on the modules, forward FLOPs by FlopCounterMode on each real aux net, and
    the cost model's estimates (what balance=memory weighs before anything is built) equal to both."""
    net = _tiny_net().eval()
    plan, h = net.plan, torch.randn(1, *SIZE)
    assert _widened(net)
    for k, (block, recipe) in enumerate(zip(net.blocks, plan.aux)):
        h = call(block, h)
        counter = FlopCounterMode(display=False)
        with counter:
            net.aux[k](h)
        assert recipe.flops == counter.get_total_flops(), k
        assert recipe.params == sum(p.numel() for p in net.aux[k].parameters())
        last = plan.blocks[recipe.block].layers[-1]
        assert aux_params(plan.layers, plan.head, last, recipe.selected_layers, recipe.light_head) == recipe.params


def _saved_bytes(net, batch: int = 8) -> list[int]:
    """What each aux net saves for backward on a real batch (SavedTensorMeter), its input left out
    as the estimate leaves it out (the block saves it)."""
    h, out = torch.randn(batch, *SIZE), []
    for k, block in enumerate(net.blocks[:len(net.aux)]):
        with torch.no_grad():
            h = call(block, h)
        x = h.clone().requires_grad_()
        with SavedTensorMeter(exclude=[*net.aux[k].parameters(), *net.aux[k].buffers(), x]) as meter:
            net.aux[k](x)
        out.append(meter.peak)
    return out


def test_the_activation_estimate_follows_what_widening_saves():
    """Measured, not restated: what widening changes in the bytes an aux net saves (against adapters
    in front) is what the cost model says it changes, aux net by aux net."""
    wide, front = _tiny_net().train(), _tiny_net(adapters="front").train()
    measured = [f - w for f, w in zip(_saved_bytes(front), _saved_bytes(wide))]
    estimated = [8 * (f.act_bytes - w.act_bytes) for f, w in zip(front.plan.aux, wide.plan.aux)]
    assert any(measured) and [m > 0 for m in measured] == [e > 0 for e in estimated]
    for m, e in zip(measured, estimated):
        assert abs(m - e) <= 0.01 * max(m, 1), (measured, estimated)


def test_widened_convs_train_with_their_unit():
    net = _tiny_net()
    before = {id(p): p.detach().clone() for w in _widened(net) for p in w.parameters()}
    opt = net.unit_optimizers(torch.optim.SGD, lr=0.1)
    net.train()
    net.training_step(torch.randn(4, *SIZE), torch.randint(0, 10, (4,)), optimizer=opt)
    moved = [not torch.equal(p, before[id(p)]) for w in _widened(net) for p in w.parameters() if p.dim() == 4]
    assert moved and all(moved)


def test_front_keeps_the_adapter_before_an_unchanged_copy_and_older_plans_build_that_way():
    wide, front = _tiny_net(), _tiny_net(adapters="front")
    assert not _widened(front) and any(isinstance(m, Adapter) for aux in front.aux for m in aux.modules())
    assert sum(r.params for r in front.plan.aux) > sum(r.params for r in wide.plan.aux)
    assert sum(r.flops for r in front.plan.aux) > sum(r.flops for r in wide.plan.aux)
    doc = wide.plan.to_dict()
    del doc["config"]["adapters"]  # as written before copies were widened
    assert Plan.from_dict(doc).config.adapters == "front"


def test_resnet32_aux_nets_hold_what_the_reference_construction_holds():
    """The authors' LocalResNet for ResNet-32 K=16, aux depth 3, pyramid 0.5 holds 1,511,608 aux
    parameters (tools/reference_peer.py builds it); in front mode ours held 1,659,064."""
    import auglocal_fx.cifar_resnet  # noqa: F401  registers resnet32_cifar
    net = to_auglocal(timm.create_model("resnet32_cifar"), 16, aux_depth=3, pyramid=0.5, tail="reference",
                      input_size=(3, 32, 32))
    assert sum(p.numel() for aux in net.aux for p in aux.parameters()) == 1_511_608


@pytest.mark.parametrize("name", ["resnet18", "regnetx_002", "mobilenetv3_small_050"])
def test_estimates_follow_widening_on_timm_families(name):
    net = to_auglocal(timm.create_model(name, num_classes=10), 6, input_size=(3, 32, 32))
    plan = net.plan
    assert any(a.startswith("widen") for r in plan.aux for a in r.adapters)
    for r in plan.aux:
        last = plan.blocks[r.block].layers[-1]
        assert aux_params(plan.layers, plan.head, last, r.selected_layers, r.light_head) == r.params


def test_a_conv_with_padding_same_is_not_widened_and_the_adapter_stays():
    """padding="same" cannot be strided: such a copy keeps the adapter in front (the estimate too)."""
    model = TinyResNet()
    for block in (model.blocks[3], model.blocks[4]):  # the identity blocks after the last widening
        block.conv1 = nn.Conv2d(32, 32, 3, padding="same", bias=False)
    torch.manual_seed(0)
    net = to_auglocal(model, 5, aux_depth=2, pyramid=0, input_size=SIZE)
    assert not [w for w in _widened(net) if w.layer in (4, 5)]
    assert any(a.startswith("conv1x1/2->32x4x4") for r in net.plan.aux for a in r.adapters)
    for r in net.plan.aux:
        last = net.plan.blocks[r.block].layers[-1]
        assert aux_params(net.plan.layers, net.plan.head, last, r.selected_layers, r.light_head) == r.params
