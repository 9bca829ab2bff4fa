"""The timm-style training options (mixup / cutmix, label smoothing, EMA, gradient clipping,
channels_last, threads, TensorBoard) with every rule, resumed exactly, and in pipeline stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_pipeline import GN, _assert_same_run, _sequential, _torchrun
from test_training import history, tiny_recipe, write_recipe

from auglocal_fx import load_auglocal
from auglocal_fx.cifar_resnet import CifarResNet
from auglocal_fx.cli.train import main as train_main
from auglocal_fx.compiler import to_auglocal
from auglocal_fx.errors import AugLocalError
from auglocal_fx.runtime.blockwise import blockwise_step
from auglocal_fx.runtime.checkpoint import read_checkpoint
from auglocal_fx.training import recipe_from_dict, train
from auglocal_fx.training.techniques import Mixing, hard_labels, loss_function

MIX = {"mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0, "label_smoothing": 0.1}
ALL = {**MIX, "ema_decay": 0.9, "clip_grad": 1.0}


@pytest.mark.parametrize("rule", ["auglocal", "dgl", "bp", "infopro", "predsim"])
def test_mixup_smoothing_ema_and_clipping_train_every_rule(tmp_path, capsys, rule):
    recipe = tiny_recipe(tmp_path, rule, epochs=1, **ALL)
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 0, capsys.readouterr().err
    (record,) = history(Path(recipe["output"]))
    assert all(torch.isfinite(torch.tensor(record["step_losses"] + record["local_losses"])))
    assert 0 <= record["train_acc"] <= 1  # against each mixed sample's larger label


def test_mixup_gives_every_loss_soft_targets_and_smoothing_folds_in():
    recipe = recipe_from_dict(tiny_recipe(Path("/tmp"), **MIX))
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    mixed, soft = Mixing(recipe, 10, torch.device("cpu"))(x, y, train=True)
    assert soft.shape == (4, 10) and torch.allclose(soft.sum(1), torch.ones(4))
    assert soft.min() >= 0.1 / 10 - 1e-6  # smoothing folded into the mixed targets
    assert loss_function(recipe) is F.cross_entropy  # so the loss does not smooth twice
    assert torch.equal(hard_labels(soft), soft.argmax(1)) and torch.equal(hard_labels(y), y)
    plain = recipe_from_dict(tiny_recipe(Path("/tmp"), label_smoothing=0.1))
    logits = torch.randn(4, 10)
    assert loss_function(plain)(logits, y) == F.cross_entropy(logits, y, label_smoothing=0.1)
    same, kept = Mixing(plain, 10, torch.device("cpu"))(x, y, train=True)
    assert torch.equal(same, x) and torch.equal(kept, y)  # no mixup: the batch as loaded


def test_odd_batch_with_mixup_is_one_line(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, batch_size=31, **MIX)
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mixup needs an even batch per process" in err


def test_clip_grad_bounds_each_units_gradient_norm():
    torch.manual_seed(0)
    net = to_auglocal(CifarResNet(20, num_classes=10), 4, input_size=(3, 16, 16))
    x, y = torch.randn(8, 3, 16, 16) * 50, torch.randint(0, 10, (8,))
    units = net.local_units()
    blockwise_step(units, x, y, clip_grad=0.01)
    norms = [torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in u.parameters() if p.grad is not None]))
             for u in units]
    assert all(n <= 0.01 + 1e-6 for n in norms), norms
    net.zero_grad()
    blockwise_step(units, x, y)
    assert all(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in u.parameters() if p.grad is not None]))
               > 0.01 for u in units)


def test_ema_is_evaluated_kept_in_best_and_resumes_exactly(tmp_path):
    full = tiny_recipe(tmp_path / "a", epochs=2, ema_decay=0.5)
    assert train_main([str(write_recipe(tmp_path, full, "full.yaml"))]) == 0
    split = tiny_recipe(tmp_path / "b", epochs=2, ema_decay=0.5)
    path = write_recipe(tmp_path, split, "split.yaml")
    assert train_main([str(path), "--stop-after", "1"]) == 0
    best = Path(split["output"]) / "best.pt"  # the averages: training does not continue from them
    with pytest.raises(AugLocalError, match="holds the averaged weights .*; resume from .*last.pt"):
        train(recipe_from_dict(split), resume=str(best))
    assert train_main([str(path), "--resume", "auto"]) == 0
    a, b = Path(full["output"]), Path(split["output"])
    assert [h["step_losses"] for h in history(a)] == [h["step_losses"] for h in history(b)]
    assert [h["val_acc"] for h in history(a)] == [h["val_acc"] for h in history(b)]
    last, best = torch.load(a / "last.pt", weights_only=True), torch.load(a / "best.pt", weights_only=True)
    ema = last["train"]["ema"]
    assert len(ema) == 4
    net = load_auglocal(a / "best.pt")  # best.pt holds the averaged weights: what was evaluated
    for unit, state in zip(net.local_units(), ema if best["train"]["epoch"] == 2 else best["train"]["ema"]):
        assert all(torch.equal(unit.state_dict()[k], v) for k, v in state.items())
    assert any(not torch.equal(last["model_state"][k], best["model_state"][k]) for k in last["model_state"])
    summary = json.loads((a / "summary.json").read_text())
    assert summary["selected_on"] == "val" and 0 <= summary["test_acc"] <= 1


def test_resuming_with_ema_switched_on_or_off_is_refused(tmp_path, capsys):
    for before, after in ((None, 0.9), (0.9, None)):
        recipe = tiny_recipe(tmp_path / str(before), epochs=2, ema_decay=before)
        path = str(write_recipe(tmp_path, recipe, f"{before}.yaml"))
        assert train_main([path, "--stop-after", "1"]) == 0
        capsys.readouterr()
        assert train_main([path, "--resume", "auto", "--set", f"ema_decay={'null' if after is None else after}"]) == 2
        err = capsys.readouterr().err
        assert f"it was trained with ema_decay = {before!r}, this recipe says {after!r}" in err, err


@pytest.mark.parametrize("rule", ["auglocal", "bp"])
def test_channels_last_and_threads(tmp_path, rule):
    from auglocal_fx.training.distributed import setup
    from auglocal_fx.training.trainer import Trainer

    threads = torch.get_num_threads()
    try:
        recipe = recipe_from_dict(tiny_recipe(tmp_path, rule, epochs=1, channels_last=True, threads=1))
        t = Trainer(recipe, setup("cpu"), log=lambda *a, **k: None)
        assert torch.get_num_threads() == 1
        conv = t.run.net.model.conv1.weight if hasattr(t.run.net.model, "conv1") else \
            next(m.weight for m in t.run.net.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.is_contiguous(memory_format=torch.channels_last)
        x, _ = t.mixing(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), train=False)
        assert x.is_contiguous(memory_format=torch.channels_last)
        record = t.train_epoch(1)
        assert all(torch.isfinite(torch.tensor(record["step_losses"])))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rule", ["auglocal", "bp"])
def test_tensorboard_writes_every_epoch_scalar(tmp_path, rule):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(tmp_path, rule, epochs=2, tensorboard=True)
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 0
    events = EventAccumulator(str(Path(recipe["output"]) / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train_loss", "train_acc", "val_acc", "lr"} <= set(tags)
    if rule != "bp":  # one block: no aux heads
        assert {"aux_val_acc/0", "local_losses/2"} <= set(tags)
    assert [e.step for e in events.Scalars("val_acc")] == [1, 2]


@pytest.mark.slow  # two launches beside the sequential run
def test_pipeline_with_every_option_is_the_sequential_run(tmp_path):
    """Mixup on the first stage (the mixed images and soft targets travel), EMA and clipping per
    stage: the same run as in one process."""
    seq = tiny_recipe(tmp_path / "seq", **GN, **ALL)
    _sequential(tmp_path, seq, "seq.yaml")
    p2 = tiny_recipe(tmp_path / "p2", **GN, **ALL, **{"parallel.pipeline": 2})
    proc = _torchrun(2, write_recipe(tmp_path, p2, "p2.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(Path(seq["output"]), Path(p2["output"]))
    # best.pt holds the averaged weights: in one file, or in the stages' shards
    a, b = (read_checkpoint(Path(r["output"]) / "best.pt") for r in (seq, p2))
    assert a["train"]["epoch"] == b["train"]["epoch"] and b["weights"] == a["weights"] == "ema"
    for part in ("model_state", "aux_state"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(b[part][k].float(), a[part][k].float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("keys, says", [
    ({"cuda_graphs": True}, "recipe key cuda_graphs needs a CUDA device and this run is on cpu"),
    ({"cuda_graphs": True, "optimizer.per_unit": False},
     "recipe key cuda_graphs works on each unit's optimizer update as it happens; set optimizer.per_unit"),
    ({"offload": "aux"}, "recipe key offload needs a CUDA device and this run is on cpu"),
    ({"offload": "aux", "optimizer.per_unit": False}, "recipe key offload works on each unit's optimizer update"),
    ({"offload": "aux", "ema_decay": 0.99}, "recipe key offload keeps the aux nets in host memory and ema_decay"),
    ({"offload": "aux", "cuda_graphs": True}, "recipe keys cuda_graphs and offload"),
    ({"overlap": True}, "recipe key overlap needs a CUDA device and this run is on cpu"),
    ({"overlap": True, "cuda_graphs": True}, "recipe keys cuda_graphs and overlap"),
])
def test_gpu_schedules_are_refused_in_one_line_where_they_cannot_run(tmp_path, capsys, keys, says):
    """cuda_graphs, offload and overlap (runtime/graphs.py, offload.py, overlap.py) on the CPU, with a
    combination that cannot work, or without per-unit steps: refused before anything is written."""
    recipe = tiny_recipe(tmp_path, **keys)
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err, err
    assert not Path(recipe["output"]).exists()
