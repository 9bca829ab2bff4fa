"""aux_head: VGG-style heavy heads get light aux heads (auto), light ones are copied; the plan,
its parameter and FLOP figures and the memory estimate follow."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

from auglocal_fx import AugLocalError, Plan, to_auglocal
from auglocal_fx.assemble.light_head import LightHead
from auglocal_fx.aux_costs import aux_act_bytes, aux_params, light_head_info
from auglocal_fx.cli.convert import main
from auglocal_fx.costs import unit_params
from auglocal_fx.modes import eval_mode
from auglocal_fx.planner import build_plan, wants_light_head


def _text(plan: Plan) -> str:
    console = Console(width=250, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(plan.table())
    return console.export_text()


def test_vgg11_converts_with_light_heads_under_twice_the_backbone(capsys):
    assert main(["--model", "vgg11", "--blocks", "8", "--input-size", "3", "32", "32", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    plan = Plan.from_dict(doc)
    backbone = sum(x.params for x in plan.layers) + plan.head.params
    assert plan.config.aux_head == "auto" and plan.head.params > 0.8 * backbone  # the ConvMlp head
    assert len(plan.aux) == 7 and all(a.light_head for a in plan.aux)
    aux = sum(a.params for a in plan.aux)
    assert backbone + aux < 2 * backbone  # copying the head: about 7 x 127M
    assert "+ light head" in _text(plan) and "aux_head=auto" in _text(plan)
    # the estimates the planner balances and the footprint reports are the built aux nets' figures
    for a in plan.aux:
        last = plan.blocks[a.block].layers[-1]
        assert aux_params(plan.layers, plan.head, last, a.selected_layers, light=True) == a.params
        assert a.flops < plan.head.flops  # the 4096-wide MLP is not counted (247 MFLOPs a copy)
    assert [u[1] for u in unit_params(plan)][:-1] == [a.params for a in plan.aux]
    assert [u["aux_params"] for u in doc["memory"]["units"]][:-1] == [a.params for a in plan.aux]


def test_light_width_is_an_option_the_heads_and_the_estimates_follow(capsys):
    """light_width (PlanConfig) narrows the light heads' MLP; the built heads, the cost model's
    estimate and the flag agree (the option is one field: the flag and recipe key are made from it)."""
    assert main(["--model", "vgg11", "--blocks", "4", "--input-size", "3", "32", "32", "--light-width", "64",
                 "--format", "json"]) == 0
    plan = Plan.from_dict(json.loads(capsys.readouterr().out))
    assert plan.config.light_width == 64 and all(a.light_head for a in plan.aux)
    for a in plan.aux:
        last = plan.blocks[a.block].layers[-1]
        assert aux_params(plan.layers, plan.head, last, a.selected_layers, light=True, width=64) == a.params
    model = timm.create_model("vgg11", num_classes=10)
    net = to_auglocal(model, 4, input_size=(3, 32, 32), aux_head="light", light_width=64)
    widths = {m.out_features for m in net.aux[0].modules() if isinstance(m, torch.nn.Linear)}
    assert widths == {64, 10}
    assert [m.summary for m in net.aux[0].modules() if isinstance(m, LightHead)] == ["light head (pool, MLP 64)"]


def test_auto_copies_resnet50s_head_and_light_replaces_it(resnet50):
    auto = build_plan(resnet50.model, 16, analysis=resnet50.analysis)
    assert not any(a.light_head for a in auto.aux)  # fc: 8% of the parameters
    light = build_plan(resnet50.model, 16, analysis=resnet50.analysis, aux_head="light")
    assert all(a.light_head for a in light.aux)
    a, b = auto.aux[0], light.aux[0]
    last = auto.blocks[0].layers[-1]
    assert aux_params(auto.layers, auto.head, last, a.selected_layers) - \
        aux_params(light.layers, light.head, last, b.selected_layers, light=True) == \
        auto.head.params - light_head_info([2048, 2, 2], "", 1000).params
    assert aux_act_bytes(light.layers, light.head, last, b.selected_layers, light=True) - \
        aux_act_bytes(auto.layers, auto.head, last, a.selected_layers) == \
        light_head_info([2048, 2, 2], "", 1000).act_bytes - auto.head.act_bytes
    with pytest.raises(AugLocalError, match=r"^aux_head='heavy' is not an aux head policy; choose one of "
                                            r"copy, light, auto$"):
        build_plan(resnet50.model, 16, analysis=resnet50.analysis, aux_head="heavy")


@pytest.mark.parametrize("shape, layout", [([512, 4, 4], ""), ([4, 4, 96], "nhwc"), ([17, 192], ""), ([64], "")])
def test_light_head_figures_are_what_it_holds_and_computes(shape, layout):
    head = LightHead(shape, layout, 10)
    info = light_head_info(shape, layout, 10)
    assert info.params == sum(p.numel() for p in head.parameters())
    counter = FlopCounterMode(display=False)
    with eval_mode(head), counter:
        assert head(torch.randn(1, *shape)).shape == (1, 10)
    assert info.flops == counter.get_total_flops()


def test_light_heads_on_a_vit_train_every_parameter():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    net = to_auglocal(model, 3, input_size=(3, 32, 32), aux_head="light")
    assert all(isinstance(aux[-1], LightHead) for aux in net.aux)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    model.eval(), net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
    net.train()
    net.zero_grad(set_to_none=True)
    net.training_step(x, y)
    assert all(p.grad is not None for p in net.parameters())


def _info(shape, params):
    from auglocal_fx.plan import LayerInfo
    return LayerInfo(name="x", boundary="", in_shape=[], out_shape=list(shape), params=params, flops=0, act_bytes=0,
                     crossing=[list(shape)], crossing_layouts=[""])


def test_auto_keeps_a_heavy_head_smaller_than_a_light_head():
    """auto replaces a head only when it is heavy (> 25% of the model) and larger than every light
    head that could replace it; copy and light are forced whatever the sizes."""
    layers = [_info([64, 8, 8], 1000), _info([256, 4, 4], 1000)]
    largest = light_head_info([256, 4, 4], "", 10).params  # 256 * 512 + 512 * 512 + 512 * 10 + ...
    def head(params):
        return _info([10], params)
    assert wants_light_head("auto", head(largest + 1), layers)
    assert not wants_light_head("auto", head(largest), layers)  # heavy (99%), but no smaller than a light head
    assert not wants_light_head("auto", head(600), layers)  # small: 23%
    assert wants_light_head("light", head(600), layers) and not wants_light_head("copy", head(10 ** 9), layers)


def test_a_head_that_predicts_per_position_keeps_its_copy():
    """A language model's head gives (tokens, vocabulary) a sample; a light head gives one prediction
    a sample, so auto never picks one there (RemBERT's heavy LM head) and light is refused."""
    layers = [_info([16, 64], 1000), _info([16, 64], 1000)]
    lm_head = _info([16, 512], 10 ** 6)  # 99.8% of the model
    assert not wants_light_head("auto", lm_head, layers)
    with pytest.raises(AugLocalError, match=r"aux_head='light' cannot replace x, which predicts per position "
                                            r"\(output \(16, 512\) a sample\).*use aux_head='copy'"):
        wants_light_head("light", lm_head, layers)


def test_mobilenetv3_small_keeps_its_head_copies():
    """Its conv head + classifier is half the model at 10 classes, yet smaller than a 512-wide light head."""
    model = timm.create_model("mobilenetv3_small_050", num_classes=10)
    plan = build_plan(model, 8, input_size=(3, 64, 64))
    assert plan.head.params > 0.25 * (plan.head.params + sum(x.params for x in plan.layers))
    assert not any(a.light_head for a in plan.aux)
