"""A plan belongs to the model it was made on: its fingerprint refuses another one, in one line."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_training import tiny_recipe, write_recipe

from auglocal_fx import AugLocalError, Plan, build_plan, load_auglocal, to_auglocal
from auglocal_fx.cli.train import main as train_main
from auglocal_fx.fingerprint import check_fingerprint, plan_fingerprint
from auglocal_fx.runtime.checkpoint import checksum

from handwritten import ResNet, cifar_resnet

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def resnet20_plan() -> Plan:
    torch.manual_seed(0)
    return build_plan(cifar_resnet(3), 4, input_size=SIZE)


def _refusal(model, plan) -> str:
    with pytest.raises(AugLocalError) as err:
        to_auglocal(model, plan=plan)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_fingerprint_is_compact_and_deterministic(resnet20_plan):
    fp = resnet20_plan.fingerprint
    assert set(fp) == {"input_size", "model", "layers", "head"}
    assert fp["input_size"] == list(SIZE)
    assert len(fp["layers"]) == resnet20_plan.num_layers
    assert all(isinstance(d, str) and len(d) <= 20 for d in [fp["model"], fp["head"], *fp["layers"]])
    torch.manual_seed(1)  # other weights, same architecture: the same fingerprint
    assert plan_fingerprint(cifar_resnet(3), resnet20_plan) == fp


def test_resnet20_plan_on_resnet32_is_refused_naming_the_first_difference(resnet20_plan):
    """The reproduced bug: every boundary the ResNet-20 plan names exists in ResNet-32 too, so the
    net used to build, with 297k of its 467k parameters in the last block."""
    plan = Plan.from_yaml(resnet20_plan.to_yaml())
    msg = _refusal(cifar_resnet(5), plan)
    assert msg.startswith("the plan was made for another model (272k parameters; this one has 467k): ")
    # blocks.0-2 are alike (16 channels); blocks.3 is ResNet-20's first 32-channel block, ResNet-32's 4th 16-channel one
    assert "layer 4 'blocks.3' has parameters blocks.3.conv1.weight 16x16x3x3" in msg
    assert "the plan's has 14.5k" in msg
    assert msg.endswith("plan this model anew (auglocal-convert, or to_auglocal without plan=)")


def test_same_architecture_other_weights_is_accepted(resnet20_plan):
    torch.manual_seed(123)
    model = cifar_resnet(3)
    net = to_auglocal(model, plan=resnet20_plan)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), model.eval()(x))


def test_extra_blocks_past_the_plans_layers_are_refused():
    """Every layer of the plan matches by name; the model's extra block lies outside them (the head's part)."""
    plan = build_plan(ResNet((8, 8), (1, 1)), 2, input_size=(3, 16, 16))
    msg = _refusal(ResNet((8, 8, 8), (1, 1, 1)), plan)
    assert "what no layer of the plan holds (the head) has parameters blocks.2.conv1.weight 8x8x3x3" in msg


def test_yaml_round_trip_keeps_the_fingerprint(resnet20_plan):
    text = resnet20_plan.to_yaml()
    back = Plan.from_yaml(text)
    assert back.fingerprint == resnet20_plan.fingerprint
    assert back == resnet20_plan
    assert yaml.safe_load(text)["fingerprint"]["layers"] == resnet20_plan.fingerprint["layers"]


def test_plan_without_fingerprint_loads_and_is_not_checked(resnet20_plan):
    d = resnet20_plan.to_dict()
    del d["fingerprint"]  # a plan written before plans had one
    old = Plan.from_yaml(yaml.safe_dump(d))
    assert old.fingerprint == {}
    check_fingerprint(cifar_resnet(5), old)  # nothing to check against
    assert len(to_auglocal(cifar_resnet(3), plan=old).blocks) == 4


def test_part_of_a_fingerprint_is_checked_on_what_it_has(resnet20_plan):
    d = resnet20_plan.to_dict()
    d["fingerprint"] = {"head": d["fingerprint"]["head"]}
    plan = Plan.from_dict(d)
    check_fingerprint(cifar_resnet(3), plan)
    with pytest.raises(AugLocalError, match=r"the plan was made for another model: what no layer .* fc.weight 7x64, fc.bias 7 \(455\) here, the plan.s has 650;"):
        check_fingerprint(cifar_resnet(3, num_classes=7), plan)


def test_edited_input_size_is_refused(resnet20_plan):
    d = resnet20_plan.to_dict()
    d["config"]["input_size"] = [3, 64, 64]
    with pytest.raises(AugLocalError, match=r"^the plan was made at input size 3x32x32 but its config says 3x64x64"):
        to_auglocal(cifar_resnet(3), plan=Plan.from_dict(d))


def test_malformed_fingerprint_is_one_line(resnet20_plan):
    d = resnet20_plan.to_dict()
    d["fingerprint"]["layers"] = 5
    with pytest.raises(AugLocalError, match="^the plan's fingerprint is malformed") as err:
        to_auglocal(cifar_resnet(3), plan=Plan.from_dict(d))
    assert "\n" not in str(err.value)


def test_load_auglocal_refuses_a_checkpoint_of_another_model(resnet20_plan, tmp_path):
    path = tmp_path / "r20.pt"
    to_auglocal(cifar_resnet(3), plan=resnet20_plan).save(path)
    assert len(load_auglocal(path, model=cifar_resnet(3)).blocks) == 4
    with pytest.raises(AugLocalError) as err:
        load_auglocal(path, model=cifar_resnet(5))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path} holds weights for another model than the ResNet given (272k parameters; ")
    assert "layer 4 'blocks.3'" in msg
    assert msg.endswith("load it with the model it was saved from")


def test_resume_checks_the_saved_plan_against_the_model(tmp_path, capsys):
    """A resumed run rebuilds its net from the checkpoint's plan (to_auglocal(plan=...)): checked too."""
    recipe = tiny_recipe(tmp_path, epochs=1, **{"data.train_limit": 32, "data.test_limit": 32})
    path = str(write_recipe(tmp_path, recipe))
    assert train_main([path]) == 0
    last = tmp_path / "run" / "last.pt"
    payload = torch.load(last, weights_only=False)
    assert payload["plan"]["fingerprint"]["layers"]
    del payload["sha256"]
    payload["plan"]["fingerprint"]["layers"][2] = "00000000/1"  # as if planned on another model
    payload["sha256"] = checksum(payload)
    torch.save(payload, last)
    capsys.readouterr()
    assert train_main([path, "--resume", str(last)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("auglocal-train: error: the checkpoint's plan was made for another model")
    assert "layer 2 " in err and "\n" not in err
    assert err.endswith("resume it with the model it was trained with, or start a new run")
