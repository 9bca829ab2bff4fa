"""The trainer's parts: named sums, one look at the losses per log interval, the composed strategy.

The trainer's runs themselves (every rule, resume, DDP) are in test_training.py; the pipeline
strategy's exactness in test_pipeline.py.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from test_training import tiny_recipe

import auglocal_fx.training.trainer as trainer_module
from auglocal_fx.errors import AugLocalError
from auglocal_fx.training import recipe_from_dict
from auglocal_fx.training.distributed import setup
from auglocal_fx.training.metrics import Sums
from auglocal_fx.training.strategies import DataParallel, PipelineStages, make_strategy
from auglocal_fx.training.trainer import Trainer


def test_sums_are_named_views_of_one_tensor():
    s = Sums({"loss": 3, "correct": 1, "steps": 2}, torch.device("cpu"))
    s.add("loss", torch.tensor([1.0, 2.0]), at=slice(1, 3))
    s.add("loss", 0.5, at=0)
    s.add("correct", torch.tensor(4))
    s.add("steps", torch.tensor([1.0, 1.0]))
    s.add("steps", 2.0, at=1)
    assert s.reduce() == {"loss": [0.5, 1.0, 2.0], "correct": [4.0], "steps": [1.0, 3.0]}


def _trainer(tmp_path, **over) -> Trainer:
    recipe = recipe_from_dict(tiny_recipe(tmp_path, epochs=1, **over))
    env = setup("cpu")
    return Trainer(recipe, env, resume=None, log=lambda *a, **k: None)


def test_host_looks_at_the_losses_once_per_log_interval(tmp_path, monkeypatch):
    """No .item() per step: the steps' losses stay on the device until the log interval's end (here 2
    of the epoch's 4 steps), then one copy each; the epoch's record is one more reduce."""
    t = _trainer(tmp_path, log_interval=2, **{"data.val_split": 0})
    assert len(t.run.train_loader) == 4
    calls = {"reduce": 0, "item": 0, "tolist": 0}
    reduce, item, tolist = Sums.reduce, torch.Tensor.item, torch.Tensor.tolist

    def counted_reduce(self, group=None):
        calls["reduce"] += 1
        return reduce(self, group)

    def counted_item(self):  # ours only: the DataLoader draws its base seed with .item() once per epoch
        calls["item"] += "auglocal_fx" in sys._getframe(1).f_code.co_filename
        return item(self)

    def counted_tolist(self):  # besides the reduces' own copies
        caller = sys._getframe(1).f_code.co_filename
        calls["tolist"] += "auglocal_fx" in caller and not caller.endswith("metrics.py")
        return tolist(self)

    monkeypatch.setattr(Sums, "reduce", counted_reduce)
    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    record = t.train_epoch(1)
    assert calls == {"reduce": 2 + 1, "item": 0, "tolist": 0}
    assert len(record["step_losses"]) == 4 and len(record["local_losses"]) == 3
    assert len(record["step_losses"]) == 4 and len(record["local_losses"]) == 3
    assert 0 <= record["train_acc"] <= 1


def test_non_finite_loss_is_named_at_its_step_within_an_interval(tmp_path, monkeypatch):
    """The check runs once per interval but names the step and block where the loss first broke."""
    t = _trainer(tmp_path)
    step_fn, seen = trainer_module.blockwise_step, [0]

    def third_step_breaks(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        seen[0] += 1
        if seen[0] == 3:
            out = dataclasses.replace(out, local_losses=out.local_losses * torch.tensor([1.0, float("nan"), 1.0]))
        return out

    monkeypatch.setattr(trainer_module, "blockwise_step", third_step_breaks)
    with pytest.raises(AugLocalError, match="loss of block 1 became nan at epoch 1 step 3; stopped"):
        t.train_epoch(1)


def test_strategy_is_chosen_by_the_recipe_and_can_be_given(tmp_path):
    env = setup("cpu")
    one = recipe_from_dict(tiny_recipe(tmp_path))
    assert isinstance(make_strategy(one, env), DataParallel)
    staged = recipe_from_dict(tiny_recipe(tmp_path, **{"parallel.pipeline": 2}))
    with pytest.raises(AugLocalError, match="parallel.pipeline is 2 but 1 process"):
        make_strategy(staged, env)
    assert PipelineStages  # the pipeline strategy itself runs under torchrun: test_pipeline.py
    t = Trainer(one, env, strategy=DataParallel(env), log=lambda *a, **k: None)
    assert t.strategy.mine == [0, 1, 2, 3] and len(t.units) == 4


def test_stage_timing_runs_a_model_of_token_ids():
    """parallel.balance: time times every unit on a batch of the model's input dtype: random floats
    would not index an embedding table."""
    from own_model_fixture import token_classifier

    from auglocal_fx import to_auglocal
    from auglocal_fx.training.stage_timing import unit_seconds

    net = to_auglocal(token_classifier(), 2, example_inputs=torch.randint(0, 32, (2, 12)))
    seconds = unit_seconds(net.local_units(), net.plan.config.input_size, 4, 2, torch.device("cpu"),
                           input_dtype=getattr(torch, net.plan.config.input_dtype))
    assert len(seconds) == 2 and all(s > 0 for s in seconds)


def test_release_frees_other_stages_but_keeps_what_this_stage_shares():
    """A pipeline process moves the other stages' tensors to the meta device, except a tensor its
    own units hold too (a buffer-only module two stages share)."""
    from auglocal_fx.training.pipeline_stages import _release

    shared = torch.nn.Module()
    shared.register_buffer("cache", torch.ones(3))
    mine, theirs = torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Sequential(torch.nn.Linear(2, 2))
    mine.add_module("rope", shared)
    theirs.add_module("rope", shared)
    _release([theirs], [mine])
    assert theirs[0].weight.device.type == "meta" and theirs[0].bias.device.type == "meta"
    assert shared.cache.device.type == "cpu" and mine[0].weight.device.type == "cpu"


def test_resume_keeps_the_data_and_a_cut_run_reports_validation_only(tmp_path, capsys):
    from test_training import write_recipe

    from auglocal_fx.cli.train import main as train_main

    recipe = tiny_recipe(tmp_path, epochs=2)
    path = str(write_recipe(tmp_path, recipe))
    assert train_main([path, "--stop-after", "1"]) == 0
    out = capsys.readouterr().out
    assert "stopped after epoch 1/2: best validation accuracy" in out and "test accuracy" not in out
    assert train_main([path, "--resume", "auto", "--set", "data.val_split=0"]) == 2
    assert ("it was trained with data.val_split = None, this recipe says 0; resume with --set data.val_split=null"
            in capsys.readouterr().err)
    assert train_main([path, "--resume", "auto"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_the_epoch_line_shows_held_out_loss_peak_memory_and_the_time_to_go():
    from auglocal_fx.training.report import epoch_line

    r = {"epoch": 3, "train_loss": 1.0, "train_acc": 0.5, "val_acc": 0.4, "val_loss": 1.25, "aux_val_acc": [0.3],
         "lr": 0.1, "images_per_s": 1000.0, "epoch_time_s": 60.0, "peak_rss_gib": [1.5, 2.25],
         "peak_allocated_gib": [3.0, 2.0]}
    line = epoch_line(r, 10, eta_s=7 * 62.0)
    assert "val loss 1.2500 acc 40.00%" in line
    assert "peak RSS 2.25 GiB, device 3.00 GiB" in line  # the largest process's
    assert line.endswith("ETA 7m14s")
    assert "ETA" not in epoch_line({**r, "epoch": 10}, 10, eta_s=0.0)  # the run is done
    no_device = {k: v for k, v in r.items() if k != "peak_allocated_gib"}
    assert "device" not in epoch_line(no_device, 10)


@pytest.mark.parametrize("mode", ["keep", "release"])
def test_the_run_keeps_freed_host_memory_unless_the_recipe_releases_it(tmp_path, monkeypatch, mode):
    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_host_memory", lambda: calls.append(1) or True)
    _trainer(tmp_path, host_memory=mode)
    assert calls == ([1] if mode == "keep" else [])
