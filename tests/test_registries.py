"""Registries, not string checks: what a rule or balance policy is comes from the registered object,
and every list of choices (CLI flags, recipe keys) is read from the registries."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from auglocal_fx import AugLocalError, to_auglocal
from auglocal_fx.assemble.aux_init import AUX_INITS
from auglocal_fx.assemble.light_head import AUX_HEADS
from auglocal_fx.cli.convert import parser as convert_parser
from auglocal_fx.cli.export import parser as export_parser
from auglocal_fx.export import EXPORTERS
from auglocal_fx.passes.partition import BALANCERS, Balance, min_max_partition, register_balance
from auglocal_fx.passes.selection import TAILS
from auglocal_fx.rules import RULES, Rule, auglocal, register_rule
from auglocal_fx.training import recipe_from_dict
from auglocal_fx.training.config import ConversionSection, OptimizerSection, ScheduleSection
from auglocal_fx.training.data import DATASETS
from auglocal_fx.training.optim import OPTIMIZERS, SCHEDULES

from handwritten import cifar_resnet

SIZE = (3, 32, 32)


def _choices(parser, flag: str) -> list[str]:
    action = next(a for a in parser()._actions if flag in a.option_strings)
    return list(action.choices)


def _field_choices(section, name: str) -> tuple:
    return next(f for f in dataclasses.fields(section) if f.name == name).metadata["choices"]()


def test_cli_and_recipe_choices_come_from_the_registries():
    assert _choices(convert_parser, "--rule") == list(RULES) == ["auglocal", "bp", "dgl", "infopro", "predsim"]
    assert _choices(convert_parser, "--balance") == list(BALANCERS)
    assert _choices(convert_parser, "--tail") == list(TAILS)
    assert _choices(convert_parser, "--aux-init") == list(AUX_INITS) == ["model", "fresh", "copy"]
    assert _choices(convert_parser, "--aux-head") == list(AUX_HEADS) == ["copy", "light", "auto"]
    assert _choices(export_parser, "--exporter") == list(EXPORTERS)
    assert _field_choices(ConversionSection, "rule") == tuple(RULES)
    assert _field_choices(ConversionSection, "balance") == tuple(BALANCERS)
    assert _field_choices(ConversionSection, "tail") == tuple(TAILS)
    assert _field_choices(ConversionSection, "aux_init") == tuple(AUX_INITS)
    assert _field_choices(ConversionSection, "aux_head") == tuple(AUX_HEADS)
    # data.dataset takes a registered name or your own package.module:function: the check names the registry
    with pytest.raises(AugLocalError, match="choose one of " + ", ".join(DATASETS) + ", or give your own"):
        recipe_from_dict({"model": {"name": "resnet18"}, "data": {"dataset": "no_such_set"}, "epochs": 1,
                          "batch_size": 2})
    assert _field_choices(OptimizerSection, "name") == tuple(OPTIMIZERS)
    assert _field_choices(ScheduleSection, "name") == tuple(SCHEDULES)


@pytest.fixture
def twin_rule():
    """A rule registered under another name that behaves as auglocal: nothing may test the name."""
    rule = register_rule(Rule("twin", "auglocal under another name", auglocal.build_aux, copies_layers=True))
    yield rule
    del RULES[rule.name]


def test_a_registered_rule_is_used_by_what_it_says_not_by_its_name(twin_rule):
    torch.manual_seed(0)
    ref = to_auglocal(cifar_resnet(2), 4, input_size=SIZE, balance="memory")
    torch.manual_seed(0)
    twin = to_auglocal(cifar_resnet(2), 4, input_size=SIZE, balance="memory", rule="twin")
    assert [b.layers for b in twin.plan.blocks] == [b.layers for b in ref.plan.blocks]
    assert [(a.selected_layers, a.flops, a.params) for a in twin.plan.aux] == \
        [(a.selected_layers, a.flops, a.params) for a in ref.plan.aux]
    recipe = {"model": {"name": "resnet20_cifar"}, "data": {"dataset": "synthetic"}, "epochs": 1,
              "batch_size": 8, "conversion": {"rule": "twin"}}
    assert recipe_from_dict(recipe).conversion.rule == "twin"  # choices are read when a recipe is checked


def test_a_rule_without_aux_nets_is_one_block():
    net = to_auglocal(cifar_resnet(1), 3, rule="bp", input_size=SIZE)
    assert RULES["bp"].one_block and len(net.blocks) == 1 and len(net.aux) == 0


def test_a_registered_balance_is_selectable():
    register_balance(Balance("params", "largest block's parameters", lambda layer: layer.params, min_max_partition))
    try:
        net = to_auglocal(cifar_resnet(2), 3, input_size=SIZE, balance="params")
        sizes = [net.plan.block_sum(b, "params") for b in net.plan.blocks]
        assert max(sizes) < sum(sizes)  # a real split, by parameters
    finally:
        del BALANCERS["params"]


def test_unknown_names_list_the_registered_choices():
    with pytest.raises(AugLocalError, match=r"^rule='hebbian' is not a rule; choose one of auglocal, bp, dgl, infopro, predsim$"):
        to_auglocal(cifar_resnet(1), 2, rule="hebbian", input_size=SIZE)
    with pytest.raises(AugLocalError, match=r"^aux_init='warm' is not an aux init; choose one of model, fresh, copy$"):
        to_auglocal(cifar_resnet(1), 2, aux_init="warm", input_size=SIZE)


def test_plan_and_planning_arguments_are_exclusive():
    net = to_auglocal(cifar_resnet(1), 2, input_size=SIZE)
    with pytest.raises(AugLocalError, match="pass either plan= or planning arguments, not both: .*blocks="):
        to_auglocal(cifar_resnet(1), 3, plan=net.plan)
    assert len(to_auglocal(cifar_resnet(1), plan=net.plan).blocks) == 2
