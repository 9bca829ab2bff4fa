"""build_plan / analyze_model / split_graph on real models: layers, partitions, eval parity."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from auglocal_fx import AugLocalError, build_plan
from auglocal_fx.assemble.split import split_graph
from auglocal_fx.costs import unit_act_bytes
from auglocal_fx.planner import analyze_model

MODELS = ["resnet50", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0", "tv_resnet18",
          "cifar_resnet8", "root_residual"]


def plan_for(case, blocks, **kw):
    return build_plan(case.model, blocks, analysis=case.analysis, model_name=case.name, **kw)


def assert_covers(plan, num_layers):
    assert [i for b in plan.blocks for i in b.layers] == list(range(num_layers))
    assert all(b.layers for b in plan.blocks)
    assert [b.index for b in plan.blocks] == list(range(len(plan.blocks)))


# -- layers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_layer_count(zoo, name):
    case = zoo(name)
    plan = plan_for(case, 1)
    assert len(plan.layers) == case.num_layers, [layer.name for layer in plan.layers]
    assert len(case.analysis.layers) == case.num_layers


def test_resnet50_layer_names(resnet50):
    names = [layer.name for layer in plan_for(resnet50, 16).layers]
    expected = [f"layer{s}.{i}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for i in range(n)]
    assert names[1:] == expected
    assert "conv1" in names[0]


def test_vit_every_transformer_block_is_a_layer(vit):
    plan = plan_for(vit, 12)
    names = [layer.name for layer in plan.layers]
    assert len(names) == 13
    assert "patch_embed" in names[0]
    for i, name in enumerate(names[1:]):
        # blocks.i alone (the final norm may join the last block, as timm groups it)
        assert re.fullmatch(rf"blocks\.{i}(\.\.norm)?", name), names
    # the cut after every transformer block is a real cut despite attn_mask / is_causal args
    cut_names = {n.name for n in vit.analysis.cuts}
    assert all(layer.boundary in cut_names for layer in plan.layers)


def test_tv_resnet18_layers_from_module_tree(zoo):
    case = zoo("tv_resnet18")
    assert not hasattr(case.model, "group_matcher")
    names = [layer.name for layer in plan_for(case, 9).layers]
    assert names[1:] == [f"layer{s}.{i}" for s in (1, 2, 3, 4) for i in (0, 1)]
    assert "conv1" in names[0]


@pytest.mark.parametrize("name", ["cifar_resnet8", "cifar_resnet32"])
def test_handwritten_layers_from_module_tree(zoo, name):
    case = zoo(name)
    names = [layer.name for layer in plan_for(case, 1).layers]
    assert "stem" in names[0]
    assert names[1:] == [f"blocks.{i}" for i in range(case.num_layers - 1)]


@pytest.mark.parametrize("name", MODELS)
def test_boundaries_are_cut_points_in_order(zoo, name):
    case = zoo(name)
    plan = plan_for(case, 1)
    order = {n.name: i for i, n in enumerate(case.analysis.gm.graph.nodes)}
    cuts = {n.name for n in case.analysis.cuts}
    pos = [order[layer.boundary] for layer in plan.layers]
    assert pos == sorted(set(pos))  # strictly increasing: every layer non-empty
    assert all(layer.boundary in cuts for layer in plan.layers)
    assert plan.head.boundary == "output"


@pytest.mark.parametrize("name", MODELS)
def test_shapes_chain(zoo, name):
    case = zoo(name)
    plan = plan_for(case, 1)
    layers = plan.layers
    assert layers[0].in_shape == list(case.input_size)
    for a, b in zip(layers, layers[1:]):
        assert a.out_shape == b.in_shape, (a.name, b.name)
    assert plan.head.in_shape == layers[-1].out_shape
    assert plan.head.out_shape == [case.num_classes]


@pytest.mark.parametrize("name", MODELS)
def test_params_and_flops(zoo, name):
    case = zoo(name)
    plan = plan_for(case, 1)
    total = sum(p.numel() for p in case.model.parameters())
    assert sum(layer.params for layer in plan.layers) + plan.head.params == total
    assert all(layer.params > 0 for layer in plan.layers), [(layer.name, layer.params) for layer in plan.layers]
    assert all(layer.flops > 0 for layer in plan.layers), [(layer.name, layer.flops) for layer in plan.layers]
    assert all(layer.act_bytes > 0 for layer in plan.layers), [(layer.name, layer.act_bytes) for layer in plan.layers]


# -- eval parity of the split graph ----------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_split_at_every_layer_reproduces_eval_output(zoo, name):
    case = zoo(name)
    plan = plan_for(case, 1)
    pieces = split_graph(case.analysis.gm, [layer.boundary for layer in plan.layers])
    assert len(pieces) == case.num_layers + 1
    case.model.eval()
    x = torch.randn(2, *case.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = case.model(x)
        y = x
        for i, piece in enumerate(pieces):
            y = piece(y)
            assert isinstance(y, torch.Tensor)
            want = plan.layers[i].out_shape if i < len(plan.layers) else plan.head.out_shape
            assert list(y.shape) == [2, *want], i
    assert torch.equal(y, ref)


def test_split_pieces_share_parameters(zoo):
    case = zoo("cifar_resnet8")
    plan = plan_for(case, 1)
    pieces = split_graph(case.analysis.gm, [layer.boundary for layer in plan.layers])
    model_params = {id(p) for p in case.model.parameters()}
    piece_params = [id(p) for piece in pieces for p in piece.parameters()]
    assert piece_params and set(piece_params) <= model_params


def test_split_rejects_unknown_boundary(zoo):
    case = zoo("cifar_resnet8")
    with pytest.raises(AugLocalError, match="not in the traced graph"):
        split_graph(case.analysis.gm, ["no_such_node"])


@pytest.mark.parametrize("node", ["blocks_0_conv1", "blocks_0_bn2", "blocks_1_shortcut_0"])
def test_split_inside_a_block_hands_on_a_bundle(zoo, node):
    # inside a residual block the shortcut input is still live: the cut hands on two tensors
    case = zoo("cifar_resnet8")
    assert node not in {n.name for n in case.analysis.cuts if len(case.analysis.live[n]) == 1}
    first, second = split_graph(case.analysis.gm, [node])
    x = torch.randn(2, *case.input_size, generator=torch.Generator().manual_seed(1))
    case.model.eval()
    with torch.no_grad():
        h = first(x)
        assert isinstance(h, tuple) and len(h) == 2
        assert torch.equal(second(*h), case.model(x))


def test_split_rejects_out_of_order_boundaries(zoo):
    case = zoo("cifar_resnet8")
    bounds = [layer.boundary.name for layer in case.analysis.layers]
    with pytest.raises(AugLocalError, match="order"):
        split_graph(case.analysis.gm, bounds[::-1])


@pytest.mark.parametrize("size", [(3, 0, 32), (3, 32.0, 32), (), (-3, 32, 32)])
def test_bad_input_size_rejected(fresh_model, size):
    with pytest.raises(AugLocalError, match="input_size=.* is not a shape"):
        analyze_model(fresh_model("cifar_resnet8"), size)


def test_input_size_mismatch_is_one_line_error(fresh_model):
    with pytest.raises(AugLocalError) as exc:
        analyze_model(fresh_model("cifar_resnet8"), (1, 32, 32))  # the stem wants 3 channels
    msg = str(exc.value)
    assert "input_size=(1, 32, 32) does not run" in msg  # the Python parameter; the CLI says --input-size
    assert "\n" not in msg, msg  # errors.py: "The message is a single line"


def test_analyze_leaves_model_untouched(fresh_model):
    torch.manual_seed(0)
    model = fresh_model("root_residual").train()
    before = copy.deepcopy(model.state_dict())
    analyze_model(model, (3, 32, 32))
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no BN statistic updates


# -- K: number of blocks -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_one_block(zoo, name):
    case = zoo(name)
    plan = plan_for(case, 1)
    assert len(plan.blocks) == 1
    assert plan.blocks[0].layers == list(range(case.num_layers))
    assert plan.aux == []


@pytest.mark.parametrize("name", MODELS)
def test_one_layer_per_block(zoo, name):
    case = zoo(name)
    n = case.num_layers
    plan = plan_for(case, n)
    assert [b.layers for b in plan.blocks] == [[i] for i in range(n)]
    assert [a.block for a in plan.aux] == list(range(n - 1))
    assert plan.aux_for(n - 1) is None
    for a in plan.aux:
        assert a.depth == len(a.selected_layers)
        assert a.selected_layers, a
        assert a.selected_layers[-1] == n - 1
        assert all(j > a.block for j in a.selected_layers)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("extra", ["zero", "too_many"])
def test_blocks_out_of_range(zoo, name, extra):
    case = zoo(name)
    n = case.num_layers
    k = 0 if extra == "zero" else n + 1
    with pytest.raises(AugLocalError) as exc:
        plan_for(case, k)
    msg = str(exc.value)
    if k == 0:  # refused by PlanConfig's own check, before the model is traced
        assert "blocks=0 is not a number of blocks: give an integer >= 1" in msg
    else:
        assert f"blocks={k} is out of range" in msg and f"use 1..{n}" in msg
    assert "\n" not in msg


def test_resnet50_sixteen_blocks(resnet50):
    plan = plan_for(resnet50, 16)
    assert len(plan.layers) == 17
    assert len(plan.blocks) == 16
    assert_covers(plan, 17)
    assert plan.blocks[0].layers == [0, 1]  # equal counts: the first block takes the extra layer
    assert len(plan.aux) == 15
    assert [a.block for a in plan.aux] == list(range(15))
    assert plan.aux_for(15) is None  # the last block trains with the model's own head
    for a in plan.aux:
        last = plan.blocks[a.block].layers[-1]
        assert a.selected_layers[-1] == 16
        assert all(j > last for j in a.selected_layers)


def test_vit_twelve_blocks(vit):
    plan = plan_for(vit, 12)
    assert len(plan.blocks) == 12
    assert_covers(plan, 13)
    assert len(plan.aux) == 11


@pytest.mark.parametrize("balance", ["flops", "memory"])
@pytest.mark.parametrize("k", [4, 16])
def test_resnet50_balanced_partitions(resnet50, balance, k):
    plan = plan_for(resnet50, k, balance=balance)
    assert plan.config.balance == balance
    assert len(plan.blocks) == k
    assert_covers(plan, 17)
    assert len(plan.aux) == k - 1
    # min-max optimal: never worse than the equal-count partition on the same cost
    equal = plan_for(resnet50, k)
    if balance == "flops":
        cost = lambda p: [p.block_sum(b, "flops") for b in p.blocks]  # noqa: E731
    else:  # a block's activations + its aux net's: what is alive at once under block-wise training
        cost = unit_act_bytes
    assert max(cost(plan)) <= max(cost(equal))


def test_resnet50_memory_partition_lowers_the_peak(resnet50):
    """K=16 over 17 layers: the paper's equal counts put stem + layer1.0 (the largest activations)
    in block 0; the memory balancer keeps the stem alone and merges two small late layers."""
    equal, memory = plan_for(resnet50, 16), plan_for(resnet50, 16, balance="memory")
    assert equal.blocks[0].layers == [0, 1]
    assert memory.blocks[0].layers == [0]
    assert max(unit_act_bytes(memory)) < 0.8 * max(unit_act_bytes(equal))


def test_act_bytes_leave_weights_out(resnet50):
    """A conv saves its weight for backward; that is not activation memory (weights are resident)."""
    plan = plan_for(resnet50, 16)
    last = plan.layers[-1]  # layer4.2 at 7x7 per sample: weights (~17.9 MB) dwarf the activations
    assert last.act_bytes < 4 * last.params / 10, (last.act_bytes, last.params)


def test_resnet50_reference_tail(resnet50):
    plan = plan_for(resnet50, 16, aux_depth=2, tail="reference")
    assert len(plan.blocks) == 14  # M = K - d
    assert_covers(plan, 17)
    assert plan.blocks[-1].layers == [14, 15, 16]
    assert len(plan.aux) == 13


@pytest.mark.parametrize("kw, match", [
    ({"aux_depth": -1}, "aux_depth=-1 is not an integer >= 0"),
    ({"pyramid": 1.5}, r"pyramid=1.5 is outside \[0, 1\]"),
    ({"balance": "speed"}, "balance='speed' is not a balance"),
    ({"tail": "paper"}, "tail='paper' is not a tail"),
])
def test_bad_options_raise(resnet50, kw, match):
    with pytest.raises(AugLocalError, match=match):
        plan_for(resnet50, 4, **kw)


# -- the paper's CIFAR ResNets through the whole pipeline -------------------------------------------
# reference values of the method's rules (README "How it works"; pinned on the bare functions in test_selection.py)
RESNET32_D2 = [[8, 15], [8, 15], [8, 15], [9, 15], [10, 15], [10, 15], [10, 15], [11, 15], [12, 15],
               [12, 15], [12, 15], [13, 15], [14, 15]]
RESNET32_D3 = [[5, 10, 15], [6, 10, 15], [6, 11, 15], [7, 11, 15], [8, 11, 15], [8, 12, 15], [10, 15],
               [11, 15], [12, 15], [12, 15], [12, 15], [13, 15]]


def test_cifar_resnet32_reference_selections(zoo):
    case = zoo("cifar_resnet32")
    p2 = plan_for(case, 16, aux_depth=2, tail="reference")
    assert len(p2.blocks) == 14
    assert [a.selected_layers for a in p2.aux] == RESNET32_D2
    p3 = plan_for(case, 16, aux_depth=3, tail="reference")
    assert len(p3.blocks) == 13
    assert [a.selected_layers for a in p3.aux] == RESNET32_D3
    assert [a.depth for a in p3.aux] == [3] * 6 + [2] * 6


def test_cifar_resnet110_reference_selections(zoo):
    case = zoo("cifar_resnet110")
    plan = plan_for(case, 55, aux_depth=3, tail="reference")
    assert len(plan.layers) == 55
    assert len(plan.blocks) == 52
    sel = [a.selected_layers for a in plan.aux]
    assert len(sel) == 51
    assert sel[:4] == [[18, 36, 54], [19, 36, 54], [19, 37, 54], [20, 37, 54]]
    assert sel[25] == [40, 54] and sel[50] == [52, 54]
    assert [a.depth for a in plan.aux] == [3] * 25 + [2] * 26
