"""Your own model and data in a recipe (model.factory, data.dataset as package.module:function), the
validation split (data.val_split), and user errors under torchrun (auglocal-train --nproc).

The model and datasets are tests/own_model_fixture.py, importable in this process (tests/ is on the
path) and, in subprocesses, through PYTHONPATH.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torchvision.transforms import v2

from auglocal_fx import load_auglocal
from auglocal_fx.cli.common import LAUNCHED, recorded_error, run_cli
from auglocal_fx.errors import AugLocalError
from auglocal_fx.runtime.checkpoint import read_checkpoint
from auglocal_fx.training import recipe_from_dict, train
from auglocal_fx.training.build import model_kwargs
from auglocal_fx.training.data import VAL_SEED, build_data, held_out

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}


def own_recipe(tmp_path: Path, **over) -> dict:
    recipe = {"model": {"factory": "own_model_fixture:small_cnn"},
              "data": {"dataset": "own_model_fixture:blobs", "num_workers": 0},
              "conversion": {"blocks": 3}, "epochs": 1, "batch_size": 16, "device": "cpu",
              "output": str(tmp_path / "run")}
    for key, value in over.items():
        node, *path = recipe, *key.split(".")
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return recipe


def _cli(*args: str, cwd: Path, env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


# -- a hand-written model on a hand-written dataset, end to end ----------------------------------------
def test_own_model_and_data_train_in_python_and_cli_and_export(tmp_path):
    # Python: train(recipe_from_dict(...))
    summary = train(recipe_from_dict(own_recipe(tmp_path / "py")), log=lambda *a, **k: None)
    assert summary["epochs_done"] == 1
    best = tmp_path / "py" / "run" / "best.pt"
    net = load_auglocal(best)  # the factory is imported and called again: no model= needed
    assert isinstance(net.backbone(), nn.Sequential) and len(net.blocks) == 3
    assert net.options["model_factory"] == "own_model_fixture:small_cnn"
    assert net.options["model_kwargs"] == {"num_classes": 4}  # the dataset's classes: the factory names num_classes
    assert net.plan.config.input_size == [3, 8, 8]  # read from the first training sample
    assert "image_stats" not in net.options  # the loader's normalisation stats: built-ins only
    # the CLI, the module found through PYTHONPATH
    recipe = own_recipe(tmp_path / "cli")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = _cli("auglocal_fx.cli.train", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout and "None" not in proc.stdout
    # auglocal-export re-makes the model from the checkpoint's factory, without extra arguments
    onnx = tmp_path / "m.onnx"
    proc = _cli("auglocal_fx.cli.export", str(tmp_path / "cli" / "run" / "best.pt"), "--out", str(onnx), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert onnx.is_file() and "Sequential backbone" in proc.stdout


def test_token_ids_train_with_their_own_validation_set(tmp_path):
    """Inputs that are not images: int64 token ids are planned as such (example_inputs from the data)."""
    recipe = recipe_from_dict(own_recipe(tmp_path, **{
        "model": {"factory": "own_model_fixture:token_classifier", "num_classes": 4},
        "data.dataset": "own_model_fixture:token_ids"}))
    data = build_data(recipe.data, classes=4)
    assert (len(data.train), len(data.val), len(data.test)) == (64, 32, 32)  # val: the dataset's own
    assert data.input_size == [12] and data.example.dtype == torch.int64 and data.channels is None
    train(recipe, log=lambda *a, **k: None)
    net = load_auglocal(tmp_path / "run" / "last.pt")
    assert net.plan.config.input_dtype == "int64" and net.plan.config.input_size == [12]


def test_factory_gets_classes_only_when_it_takes_them(tmp_path):
    data = build_data(recipe_from_dict(own_recipe(tmp_path)).data)
    kwargs = model_kwargs(recipe_from_dict(own_recipe(tmp_path)), data)
    assert kwargs == {"num_classes": 4}  # small_cnn(num_classes=...): the dataset's 4 classes
    over = recipe_from_dict(own_recipe(tmp_path, **{"model.kwargs": {"width": 4}, "model.num_classes": 6}))
    assert model_kwargs(over, data) == {"width": 4, "num_classes": 6}
    bad = recipe_from_dict(own_recipe(tmp_path, **{"model.in_chans": 3}))  # small_cnn takes no in_chans
    with pytest.raises(AugLocalError, match="recipe key model.in_chans is 3 but model.factory .* takes no in_chans"):
        model_kwargs(bad, data)


# -- data.val_split -----------------------------------------------------------------------------------
def _indices(ds) -> list[int]:
    return [int(i) for i in ds.indices]


@pytest.mark.parametrize("val_split,k", [(None, 6), (0.25, 16), (10, 10), (10.0, 10), (0.001, 1)])
def test_val_split_sizes_and_disjoint(tmp_path, val_split, k):
    data = build_data(recipe_from_dict(own_recipe(tmp_path, **{"data.val_split": val_split})).data)
    assert (len(data.train), len(data.val)) == (64 - k, k)
    train, val = _indices(data.train), _indices(data.val)
    assert not set(train) & set(val) and sorted(train + val) == list(range(64))
    expected = torch.randperm(64, generator=torch.Generator().manual_seed(VAL_SEED))[:k].sort().values.tolist()
    assert val == expected  # a fixed seed, whatever the run's: every run chooses on the same images


def test_val_split_is_the_same_for_every_run_seed_and_cut_after_train_limit(tmp_path):
    a = build_data(recipe_from_dict(own_recipe(tmp_path, seed=1)).data)
    b = build_data(recipe_from_dict(own_recipe(tmp_path, seed=2)).data)
    assert _indices(a.val) == _indices(b.val) and _indices(a.train) == _indices(b.train)
    limited = build_data(recipe_from_dict(own_recipe(tmp_path, **{"data.train_limit": 40,
                                                                 "data.val_split": 0.25})).data)
    assert (len(limited.train), len(limited.val)) == (30, 10)  # a quarter of the 40 kept
    assert max(_indices(limited.train) + _indices(limited.val)) < 40
    none = build_data(recipe_from_dict(own_recipe(tmp_path, **{"data.val_split": 0})).data)
    assert none.val is None and len(none.train) == 64


def _write_idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def test_held_out_images_get_the_test_transforms(tmp_path):
    """A built-in dataset: the held-out images come from the training files, without augmentation."""
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    for split, n in (("train", 50), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[:n])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", torch.arange(n) % 10)
    recipe = recipe_from_dict(own_recipe(tmp_path, model={"name": "resnet20_cifar"},
                                         data={"dataset": "fashion_mnist", "root": str(tmp_path)}))
    data = build_data(recipe.data)
    assert (len(data.train), len(data.val), len(data.test)) == (45, 5, 10)  # default 0.1 of 50
    assert data.val.base is data.train.base  # one training set, loaded once
    kinds = {t: [type(s) for s in ds.transform.transforms] for t, ds in (("train", data.train), ("val", data.val))}
    assert v2.RandomCrop in kinds["train"] and v2.RandomHorizontalFlip in kinds["train"]
    assert v2.RandomCrop not in kinds["val"] and v2.RandomHorizontalFlip not in kinds["val"]
    i = _indices(data.val)[0]
    x, y = data.val[0]
    assert torch.equal(x, data.val[0][0]) and y == i % 10  # deterministic, and the right image
    mean, std = 0.2860, 0.3530
    torch.testing.assert_close(x, (images[i].float()[None] / 255 - mean) / std)


def test_synthetic_draws_its_validation_images(tmp_path):
    recipe = recipe_from_dict(own_recipe(tmp_path, model={"name": "resnet20_cifar"},
                                         data={"dataset": "synthetic", "train_limit": 128, "image_size": 16}))
    data = build_data(recipe.data)
    assert (len(data.train), len(data.val)) == (128, 13)  # the training set keeps its size
    assert not torch.equal(data.val.images[:13], data.train.images[:13])  # a third draw of noise


def _image_folder(root: Path, splits) -> None:
    from PIL import Image

    for split in splits:
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / cls / f"{i}.png")


def test_imagefolder_val_is_the_test_set_unless_there_is_test(tmp_path):
    two = tmp_path / "two"
    _image_folder(two, ("train", "val"))
    recipe = recipe_from_dict(own_recipe(tmp_path, model={"name": "resnet20_cifar"},
                                         data={"dataset": "imagefolder", "root": str(two), "image_size": 8}))
    data = build_data(recipe.data)
    assert data.val is None and len(data.train) == 6 and data.test.root.endswith("val")
    three = tmp_path / "three"
    _image_folder(three, ("train", "val", "test"))
    recipe.data.root = str(three)
    data = build_data(recipe.data)
    assert len(data.train) == 6 and data.val.root.endswith("val") and data.test.root.endswith("test")
    recipe.data.val_split = 0.5
    with pytest.raises(AugLocalError, match="has its own validation set"):
        build_data(recipe.data)


def test_held_out_counts():
    assert held_out(None, 100, 0.1, "x") == 10 and held_out(0, 100, 0.1, "x") == 0
    assert held_out(0.004, 100, 0.1, "x") == 1  # at least one image
    with pytest.raises(AugLocalError, match=r"data.val_split = 0.1 \(the default for x\) holds out 1 of x's 1"):
        held_out(None, 1, 0.1, "x")


# -- recipe errors (one line each; the CLI's are rows of tests/test_errors.py) -------------------------
RECIPE_ERRORS = [
    # (id, the recipe's change, words of the one-line error)
    ("neither", lambda t: {**own_recipe(t), "model": {}}, "recipe key model.name is missing; give a timm name, "
                                                          "or model.factory"),
    ("both", lambda t: own_recipe(t, **{"model.name": "resnet18"}), "recipe keys model.name ('resnet18') and "
                                                                   "model.factory"),
    ("no-colon", lambda t: own_recipe(t, **{"model.factory": "own_model_fixture.small_cnn"}),
     "give package.module:function"),
    ("pretrained", lambda t: own_recipe(t, **{"model.pretrained": True}), "model.pretrained is for timm names"),
    ("unknown-dataset", lambda t: own_recipe(t, **{"data.dataset": "mnist"}), "choose one of fashion_mnist"),
    ("root-with-own-data", lambda t: own_recipe(t, **{"data.root": "/data"}),
     "recipe key data.root is for the built-in datasets"),
    ("kwargs-with-builtin", lambda t: own_recipe(t, model={"name": "resnet20_cifar"},
                                                 data={"dataset": "synthetic", "kwargs": {"n": 1}}),
     "data.kwargs is for a dataset given as package.module:function"),
    ("val-split-negative", lambda t: own_recipe(t, **{"data.val_split": -0.1}),
     "recipe key data.val_split must be a fraction in (0, 1) or a count"),
    ("val-split-fractional-count", lambda t: own_recipe(t, **{"data.val_split": 2.5}),
     "recipe key data.val_split must be a fraction in (0, 1) or a count"),
    ("val-split-word", lambda t: own_recipe(t, **{"data.val_split": "some"}), "recipe key data.val_split must be"),
]


@pytest.mark.parametrize("recipe,words", [c[1:] for c in RECIPE_ERRORS], ids=[c[0] for c in RECIPE_ERRORS])
def test_recipe_errors(tmp_path, recipe, words):
    with pytest.raises(AugLocalError) as err:
        recipe_from_dict(recipe(tmp_path))
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


# -- labels and the model's class scores: refused in one line, not an IndexError in the first step --------
@pytest.mark.parametrize("change, words", [
    ({"model.num_classes": 2}, "the recipe gives 2 classes (model.num_classes or model.kwargs.num_classes) but "
                               "recipe key data.dataset 'own_model_fixture:blobs' has 4"),
    ({"data.dataset": "own_model_fixture:mislabelled", "data.val_split": 0},
     "a training label is 4 but the model gives 4 class scores (labels 0 to 3)"),
])
def test_labels_past_the_models_class_scores_are_one_line(tmp_path, change, words):
    with pytest.raises(AugLocalError) as err:
        train(recipe_from_dict(own_recipe(tmp_path, **change)), log=lambda *a, **k: None)
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_model_with_fewer_outputs_than_the_data_has_classes_is_refused_before_it_writes(tmp_path):
    recipe = own_recipe(tmp_path, **{"model.factory": "own_model_fixture:two_score_cnn"})
    with pytest.raises(AugLocalError, match=r"the model gives 2 class scores but own_model_fixture:blobs has 4 "
                                            r"classes \(labels up to 3\)") as err:
        train(recipe_from_dict(recipe), log=lambda *a, **k: None)
    assert "\n" not in str(err.value)
    assert not Path(recipe["output"]).exists()


# -- user errors under torchrun -----------------------------------------------------------------------
def _fail(message: str):
    def body():
        raise AugLocalError(message)
    return body


def test_workers_print_once_and_record_for_the_launcher(tmp_path, monkeypatch, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", "1")
    assert run_cli("auglocal-train", _fail("bad value")) == 2  # RANK alone (not torchrun): printed
    assert capsys.readouterr().err == "auglocal-train: error: bad value\n"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # what torchelastic's agent sets for its workers
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert run_cli("auglocal-train", _fail("bad value")) == 2
    assert capsys.readouterr().err == ""  # rank 1 records it, rank 0 prints it
    line = recorded_error("auglocal-train", json.loads(error_file.read_text())["message"])
    assert line == "auglocal-train: error: bad value"
    monkeypatch.setenv("RANK", "0")
    assert run_cli("auglocal-train", _fail("bad value")) == 2
    assert capsys.readouterr().err == "auglocal-train: error: bad value\n"
    monkeypatch.setenv(LAUNCHED, "1")  # under auglocal-train --nproc the launcher prints it
    assert run_cli("auglocal-train", _fail("bad value")) == 2
    assert capsys.readouterr().err == ""
    assert recorded_error("auglocal-train", "Signal 15 (SIGTERM) received by PID 7") is None


@pytest.mark.slow  # 14 s of torchrun processes: in the slow tier, to keep make test in budget
def test_nproc_user_error_is_one_line_exit_2(tmp_path):
    """A recipe value every process refuses (2 pipeline stages' worth of 3 asked): one line from the
    launcher, exit status 2, no torchrun traceback or failure report."""
    recipe = own_recipe(tmp_path, **{"parallel.pipeline": 3})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = _cli("auglocal_fx.cli.train", str(path), "--nproc", "2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert err.count("auglocal-train: error: recipe key parallel.pipeline is 3 but 2 process(es)") == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err and "ChildFailedError" not in err, err


@pytest.mark.slow
def test_nproc_trains_in_two_processes(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(own_recipe(tmp_path, batch_size=8)))
    proc = _cli("auglocal_fx.cli.train", str(path), "--nproc", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1  # rank 0 reports
    assert read_checkpoint(tmp_path / "run" / "last.pt")["train"]["epoch"] == 1
