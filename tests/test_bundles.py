"""Block-granular layers: coarse groupings refined into repeated blocks, and cuts that hand on a
bundle of tensors (a CSP partial branch, a dense feature list, a class token, U-Net skips)."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

from auglocal_fx import AugLocalError, to_auglocal
from auglocal_fx.costs import unit_act_bytes
from auglocal_fx.errors import AugLocalWarning
from auglocal_fx.passes.module_groups import repeated_blocks
from auglocal_fx.planner import analyze_model
from auglocal_fx.runtime.bundles import call, detach
from auglocal_fx.testing.zoo import check_model

from checks import assert_gradient_isolation
from handwritten import ClassTokenNet, CSPNet, DenseNet, ShapeReadNet, UNet, cifar_resnet

SIZE = (3, 32, 32)
# name -> (factory, fewest layers expected, largest bundle expected at some layer boundary)
HANDWRITTEN = {
    "csp": (CSPNet, 7, 2),  # stem + 2 stages x 3 blocks; the skipped half crosses every block boundary
    "dense": (DenseNet, 5, 4),  # stem + 4 dense layers; the feature list grows by one per layer
    "class_token": (ClassTokenNet, 5, 2),  # embed + 4 blocks on (cls, patches)
    "unet": (lambda: UNet(num_classes=3), 8, 3),  # encoder convs, decoder stages; skips cross the middle
    "shape_read": (ShapeReadNet, 4, 1),  # embed + 3 token blocks; B, C, H, W ride along beside the tokens
}


def _labels(name: str, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if name == "unet":
        return x.argmax(dim=1)  # a class per pixel: its brightest channel (learnable)
    return torch.randint(0, 10, (len(x),), generator=g)


@pytest.mark.parametrize("name", list(HANDWRITTEN))
def test_bundle_models_split_per_block(name):
    factory, fewest, widest = HANDWRITTEN[name]
    torch.manual_seed(0)
    model = factory()
    layers = len(analyze_model(model, SIZE).layers)
    assert layers >= fewest
    net = to_auglocal(model, min(16, layers), input_size=SIZE)
    plan = net.plan
    assert len(plan.blocks) == min(16, layers) and not plan.notes
    assert max(layer.tensors for layer in plan.layers) == widest
    assert all(len(layer.crossing) == len(layer.crossing_dtypes) for layer in plan.layers)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *SIZE, generator=g)
    y = _labels(name, x, g)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), model.eval()(x))  # eval parity, bit for bit
    assert_gradient_isolation(net, x, y)  # per tensor of every bundle: no gradient crosses a cut
    net.zero_grad(set_to_none=True)
    net.train().training_step(x, y)
    assert not [n for n, p in net.named_parameters() if p.grad is None]


def test_every_tensor_of_a_bundle_is_detached_in_training():
    torch.manual_seed(0)
    net = to_auglocal(DenseNet(), 5, input_size=SIZE)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        h = call(net.blocks[1], call(net.blocks[0], x))
    assert isinstance(h, tuple) and len(h) == 2  # stem features + the first dense layer's
    assert all(not t.requires_grad for t in detach(tuple(t.requires_grad_() for t in h)))
    net.train()(x).sum().backward()  # the net's own forward detaches every tensor between blocks
    assert all(p.grad is None for i in range(len(net.blocks) - 1) for p in net.block_parameters(i))
    assert all(p.grad is not None for p in net.block_parameters(len(net.blocks) - 1))


def test_unet_trains_pixelwise_with_a_falling_loss():
    """A dense-prediction model: per-pixel cross-entropy through training_step(loss_fn=...)."""
    torch.manual_seed(0)
    net = to_auglocal(UNet(num_classes=3), 4, input_size=SIZE)
    assert len(net.blocks) == 4 and max(len(layer.bundle) for layer in net.plan.layers) >= 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, *SIZE, generator=g)
    y = _labels("unet", x, g)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = net.train().training_step(x, y, loss_fn=lambda logits, t: F.cross_entropy(logits, t))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss)
        assert out.logits.shape == (8, 3, *SIZE[1:]) and len(out.local_losses) == 3
    assert losses[-1] < 0.7 * losses[0], losses


def test_sizes_ride_along_and_are_remade_in_aux_nets():
    torch.manual_seed(0)
    net = to_auglocal(ShapeReadNet(), 4, input_size=SIZE)
    kinds = net.plan.layers[1].crossing_dtypes
    assert kinds[:4] == ["batch", "int=16", "int=8", "int=8"] and kinds[-1] == "float32"
    x = torch.randn(3, *SIZE)  # another batch size than planned: the batch slot is read off a tensor
    assert net.train().training_step(x, torch.randint(0, 10, (3,))).loss > 0


def test_memory_estimate_counts_every_tensor_of_a_bundle():
    torch.manual_seed(0)
    net = to_auglocal(DenseNet(), 5, input_size=SIZE, balance="memory")
    assert all(v > 0 for v in unit_act_bytes(net.plan))
    wide = [layer for layer in net.plan.layers if len(layer.bundle) > 1]
    assert wide and all(layer.bundle[-1] == layer.out_shape for layer in wide)
    layers = net.plan.layers  # the earlier features ride into each dense layer: 4 bytes per float
    assert [x.carried_bytes for x in layers] == [0, 0] + [4 * sum(c * h * w for c, h, w in layers[j - 1].crossing[:-1])
                                                          for j in range(2, len(layers))]
    assert layers[2].carried_bytes > 0 and cifar_layers_carry_nothing()


def cifar_layers_carry_nothing() -> bool:
    net = to_auglocal(cifar_resnet(1), 2, input_size=SIZE, balance="memory")
    return all(layer.carried_bytes == 0 for layer in net.plan.layers)


def test_single_tensor_cuts_only_merge_and_say_why():
    """max_bundle=1 gives the old behaviour: the dense block is one layer, and a note says why."""
    with pytest.warns(AugLocalWarning, match=r"single layer|only \d+ layers.*tensors live across"):
        net = to_auglocal(DenseNet(layers=6), 1, input_size=SIZE, max_bundle=1)
    assert len(net.plan.layers) <= 2 and net.plan.notes
    assert "\n" not in net.plan.notes[0] and "max_bundle=1" in net.plan.notes[0]
    with pytest.raises(AugLocalError, match="max_bundle=0 is not an integer >= 1"):
        to_auglocal(DenseNet(), 1, input_size=SIZE, max_bundle=0)


def test_no_note_when_the_model_splits_per_block():
    with warnings.catch_warnings():
        warnings.simplefilter("error", AugLocalWarning)
        net = to_auglocal(cifar_resnet(2), 4, input_size=SIZE)
    assert net.plan.notes == []


def test_repeated_blocks_counts_the_module_tree():
    assert repeated_blocks(cifar_resnet(5)) == 15  # 3 x 5 basic blocks in one ModuleList
    assert repeated_blocks(timm.create_model("resnet50")) == 16
    assert repeated_blocks(timm.create_model("vit_tiny_patch16_224")) == 12
    assert repeated_blocks(DenseNet(layers=4)) == 4


# timm families whose matcher returns stages, or whose blocks hand on more than one tensor
# (densenet121 runs in test_zoo.py; the other families in tools/zoo_check.py)
# cspresnet50, pit_s_224 and naflexvit (15-19 s each on 2 cores) in the slow tier, to keep make test in budget
@pytest.mark.parametrize("name, fewest", [("poolformerv2_s12", 12), pytest.param("cspresnet50", 13, marks=pytest.mark.slow),
                                          pytest.param("pit_s_224", 12, marks=pytest.mark.slow),
                                          pytest.param("naflexvit_base_patch16_gap", 12, marks=pytest.mark.slow)])
def test_timm_families_reach_block_granularity(name, fewest):
    result = check_model(name, blocks=16)
    assert result.ok, result.error
    assert result.layers >= fewest and result.blocks == min(16, result.layers)
    assert result.granular and result.widest_cut >= 1
