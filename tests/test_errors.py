"""Every user-facing error: one line naming what is wrong and what to do, exit status 2, no traceback.

One row per line of the error table in docs/reference/errors.md (same ids, same order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

from auglocal_fx import AugLocalError, load_auglocal, to_auglocal
from auglocal_fx.cli.convert import main as convert_main
from auglocal_fx.cli.export import main as export_main
from auglocal_fx.cli.train import main as train_main
from auglocal_fx.export import export_onnx
from auglocal_fx.runtime.checkpoint import checksum

SMALL = ["--input-size", "3", "32", "32"]


def _recipe(tmp: Path, **change) -> str:
    r = {"model": {"name": "resnet20_cifar"},
         "data": {"dataset": "synthetic", "image_size": 16, "train_limit": 64, "test_limit": 32, "num_workers": 0},
         "conversion": {"blocks": 4}, "epochs": 1, "batch_size": 32, "device": "cpu", "output": str(tmp / "run")}
    for key, value in change.items():
        node, *path = r, *key.split(".")
        for p in path[:-1]:
            node = node[p]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


def _checkpoint(tmp: Path) -> Path:
    path = tmp / "c.pt"
    assert convert_main(["--model", "resnet18", "--blocks", "3", *SMALL, "--save", str(path)]) == 0
    return path


def _other_model_checkpoint(tmp: Path) -> Path:
    """A resnet18 checkpoint whose plan claims resnet34: the weights belong to another model."""
    path = _checkpoint(tmp)
    payload = torch.load(path, weights_only=True)
    del payload["sha256"]
    payload["plan"]["config"]["model"] = "resnet34"
    payload["sha256"] = checksum(payload)  # a consistent file, just not these weights' architecture
    torch.save(payload, path)
    return path


def _truncated(tmp: Path) -> Path:
    path = _checkpoint(tmp)
    path.write_bytes(path.read_bytes()[:4096])  # what a write cut off half-way leaves
    return path


def _bit_flipped(tmp: Path) -> Path:
    """One flipped bit inside the weights: torch.load reads it without complaint, the checksum does not."""
    path = _checkpoint(tmp)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def _write(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.fc(x)


class _Bessel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.special.bessel_j0(x).flatten(1))


def _nan_loss(tmp: Path, monkeypatch) -> list[str]:
    """One good epoch, then a resumed epoch whose loss is NaN: the error names the block and the kept file."""
    recipe = _recipe(tmp, epochs=2)
    assert train_main([recipe, "--stop-after", "1"]) == 0
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: torch.tensor(float("nan"),
                                                                                         requires_grad=True))
    return [recipe, "--resume", str(tmp / "run" / "last.pt")]


def _second_run(tmp: Path, monkeypatch) -> list[str]:
    """A finished run in the output folder, then another recipe pointed at the same folder."""
    assert train_main([_recipe(tmp)]) == 0
    return [_recipe(tmp, **{"conversion.blocks": 3})]


def _custom_checkpoint(tmp: Path) -> Path:
    """A converted net of a hand-written model (not a timm name: the CLI cannot re-create it)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    path = tmp / "custom.pt"
    to_auglocal(model, 2, input_size=(3, 16, 16)).save(path)
    return path


def _recipe_in_output(tmp: Path) -> list[str]:
    """A recipe saved in the folder its run writes to, as recipe.yaml: the run would replace it."""
    src = Path(_recipe(tmp, output=str(tmp)))
    dest = tmp / "recipe.yaml"
    dest.write_text(src.read_text())
    return [str(dest)]


def _duplicate_key(tmp: Path) -> list[str]:
    path = Path(_recipe(tmp))
    path.write_text(path.read_text() + "epochs: 3\n")
    return [str(path)]


_HELD: list = []  # run-folder locks a case holds while its command runs


@pytest.fixture(autouse=True)
def _release_held():
    yield
    while _HELD:
        _HELD.pop().release()


def _in_use(tmp: Path) -> list[str]:
    """A run folder another run holds (its lock taken here, let go when the test ends)."""
    from auglocal_fx.training.run_folder import RunLock

    (tmp / "run").mkdir()
    _HELD.append(RunLock(tmp / "run", {"recipe": "first.yaml"}))
    return [_recipe(tmp)]


def _users_file(tmp: Path) -> list[str]:
    (tmp / "run").mkdir()
    _write(tmp / "run", "notes.txt", b"mine")
    return [_recipe(tmp)]


def _best_only(tmp: Path) -> list[str]:
    """A finished run whose last.pt is gone: its best.pt alone is no point to continue from."""
    train_main([_recipe(tmp)])
    (tmp / "run" / "last.pt").unlink()
    return [_recipe(tmp)]


def _own(tmp: Path, model: str = "own_model_fixture:small_cnn", dataset: str = "own_model_fixture:blobs",
         **change) -> str:
    """A recipe of your own model and data (tests/own_model_fixture.py), changed as ``_recipe`` does."""
    return _recipe(tmp, model={"factory": model}, data={"dataset": dataset, "num_workers": 0}, **change)


def _resnet18_weights(tmp: Path) -> str:
    """A timm weights file of resnet18: another architecture than the recipe's resnet20_cifar."""
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), tmp / "resnet18.pth")
    return str(tmp / "resnet18.pth")


def _factory_checkpoint(tmp: Path) -> Path:
    """A checkpoint auglocal-train made with a model.factory that cannot be imported where it is read."""
    from own_model_fixture import small_cnn

    net = to_auglocal(small_cnn(), 2, input_size=(3, 8, 8))
    net.options.update(model_factory="no_such_package.models:small_cnn", model_kwargs={"num_classes": 4})
    net.save(tmp / "own.pt")
    return tmp / "own.pt"


# (id, CLI main, argv builder(tmp, monkeypatch), words the message must contain)
CLI_CASES = [
    ("unknown-model", convert_main, lambda t, m: ["--model", "resnet5O", "--blocks", "4"],
     ["unknown model 'resnet5O'", "did you mean resnet50"]),
    ("blocks-below-1", convert_main, lambda t, m: ["--model", "resnet18", "--blocks", "0", *SMALL],
     ["--blocks 0 is not a number of blocks: give an integer >= 1"]),
    ("blocks-above-layers", convert_main, lambda t, m: ["--model", "resnet18", "--blocks", "99", *SMALL],
     ["--blocks 99 is out of range for resnet18 (it has 9 layers): use 1..9"]),
    ("aux-depth-negative", convert_main, lambda t, m: ["--model", "resnet18", "--blocks", "4", "--aux-depth", "-1"],
     ["--aux-depth -1 is not an integer >= 0"]),
    ("tau-outside-0-1", convert_main, lambda t, m: ["--model", "resnet18", "--blocks", "4", "--pyramid", "1.5"],
     ["--pyramid 1.5 is outside [0, 1]"]),
    ("bad-input-size", convert_main, lambda t, m: ["--model", "resnet18", "--blocks", "4", "--input-size", "3", "0", "9"],
     ["--input-size (3, 0, 9) is not a shape", "positive integers"]),
    ("recipe-missing", train_main, lambda t, m: [str(t / "nope.yaml")], ["recipe", "does not exist"]),
    ("recipe-is-folder", train_main, lambda t, m: [str(t)], ["recipe", "is a folder; give a recipe file in it"]),
    ("recipe-not-yaml", train_main, lambda t, m: [_write(t, "r.yaml", b"model: {name: [\n")],
     ["is not valid YAML at line"]),
    ("recipe-unknown-key", train_main, lambda t, m: [_recipe(t, **{"optimizer": {"lrr": 0.1}})],
     ["unknown recipe key optimizer.lrr: did you mean lr?"]),
    ("recipe-missing-key", train_main, lambda t, m: [_recipe(t, epochs=None)],
     ["recipe key epochs is missing"]),
    ("recipe-wrong-type", train_main, lambda t, m: [_recipe(t, batch_size="large")],
     ["recipe key batch_size must be an integer, got 'large'"]),
    ("dataset-missing-offline", train_main,
     lambda t, m: [_recipe(t, data={"dataset": "fashion_mnist", "root": str(t / "none")})],
     ["fashion_mnist not found", "apt-get install dataset-fashion-mnist"]),
    ("output-not-writable", train_main, lambda t, m: [_recipe(t, output="/proc/no-such-dir")],
     ["output directory /proc/no-such-dir is not writable"]),
    ("output-is-file", train_main, lambda t, m: [_recipe(t, output=str(_write(t, "notes.txt", b"mine")))],
     ["recipe key output", "notes.txt is a file; give a folder for the run's files"]),
    ("non-finite-loss", train_main, _nan_loss,
     ["loss of block 0 became nan at epoch 2 step 1", "holds epoch 1", "lower optimizer.lr"]),
    ("non-finite-input", train_main,
     lambda t, m: [_own(t, dataset="own_model_fixture:with_nan", **{"conversion.blocks": 3})],
     ["the input batch of epoch 1 step", "holds NaN or inf values", "check the dataset and its transforms"]),
    ("resume-other-conversion", train_main,
     lambda t, m: (train_main([_recipe(t)]), [_recipe(t, **{"conversion.blocks": 3}), "--resume", "auto"])[1],
     ["cannot resume", "conversion.blocks = 4, this recipe says 3"]),
    ("checkpoint-missing", export_main, lambda t, m: [str(t / "none.pt"), "--out", str(t / "m.onnx")],
     ["checkpoint", "does not exist"]),
    ("checkpoint-truncated", export_main, lambda t, m: [str(_truncated(t)), "--out", str(t / "m.onnx")],
     ["is unreadable or corrupt", "re-create it"]),
    ("checkpoint-bit-flipped", export_main, lambda t, m: [str(_bit_flipped(t)), "--out", str(t / "m.onnx")],
     ["is corrupt (its contents do not match their SHA-256 checksum)"]),
    ("checkpoint-corrupt", export_main,
     lambda t, m: [_write(t, "c.pt", b"\x00garbage" * 64), "--out", str(t / "m.onnx")],
     ["is unreadable or corrupt"]),
    ("checkpoint-not-auglocal", export_main,
     lambda t, m: (torch.save({"state_dict": {}}, t / "c.pt"), [str(t / "c.pt"), "--out", str(t / "m.onnx")])[1],
     ["is not an auglocal-fx checkpoint"]),
    ("checkpoint-other-model", export_main,
     lambda t, m: [str(_other_model_checkpoint(t)), "--out", str(t / "m.onnx")],
     ["holds weights for another model"]),
    ("recipe-blocks-above-layers", train_main, lambda t, m: [_recipe(t, **{"conversion.blocks": 99})],
     ["recipe key conversion.blocks = 99 is out of range for resnet20_cifar (it has 10 layers): use 1..10"]),
    ("export-out-folder-missing", export_main,
     lambda t, m: [str(_checkpoint(t)), "--out", str(t / "none" / "m.onnx")],
     ["folder", "does not exist"]),
    ("output-holds-run", train_main, _second_run,
     ["already holds a run", "--resume auto", "--overwrite"]),
    ("output-holds-best-only", train_main, lambda t, m: _best_only(t),
     ["holds a run's best.pt but no last.pt to continue from", "model.checkpoint=", "--overwrite"]),
    ("output-holds-users-files", train_main, lambda t, m: _users_file(t),
     ["output folder", "holds files no run wrote (notes.txt); a run writes into a new or empty folder",
      "(--set output=DIR)"]),
    ("output-in-use", train_main, lambda t, m: _in_use(t),
     ["is in use by another run (process", "wait for it to end, or write to another folder"]),
    ("run-file-is-folder", train_main, lambda t, m: ((t / "run" / "last.pt").mkdir(parents=True), [_recipe(t)])[1],
     ["output folder", "holds a folder named last.pt where the run writes that file; move it away",
      "(--set output=DIR)"]),
    ("recipe-out-of-range", train_main, lambda t, m: [_recipe(t, **{"data.train_limit": 0})],
     ["recipe key data.train_limit", "leave the key out"]),
    ("num-classes-below-1", convert_main, lambda t, m: ["--model", "resnet18", "--blocks", "4", "--num-classes", "0"],
     ["--num-classes 0"]),
    ("input-size-beyond-memory", convert_main,
     lambda t, m: ["--model", "resnet18", "--blocks", "4", "--input-size", "3", "100000", "100000"],
     ["GiB for one float32 sample"]),
    ("save-is-folder", convert_main, lambda t, m: ["--model", "resnet18", "--blocks", "4", *SMALL, "--save", str(t)],
     ["--save", "is a folder"]),
    ("layers-match-nothing", convert_main,
     lambda t, m: ["--model", "resnet18", "--blocks", "2", *SMALL, "--layers", "stage*"],
     ["--layers 'stage*' matches no module of ResNet"]),
    ("export-out-is-input", export_main, lambda t, m: [str(_checkpoint(t)), "--out", str(t / "c.pt")],
     ["is also this command's input", "choose another output path"]),
    ("opset-out-of-range", export_main, lambda t, m: [str(_checkpoint(t)), "--out", str(t / "m.onnx"), "--opset", "26"],
     ["--opset 26 is out of range"]),
    ("batch-below-1", convert_main, lambda t, m: ["--model", "resnet18", "--blocks", "4", *SMALL, "--batch", "0"],
     ["--batch 0 is not a batch size: give an integer >= 1"]),
    ("pipeline-without-processes", train_main, lambda t, m: [_recipe(t), "--set", "parallel.pipeline=2"],
     ["recipe key parallel.pipeline is 2 but 1 process(es) were started; launch a multiple of 2: auglocal-train "
      "--nproc 2"]),
    ("save-exists", convert_main,
     lambda t, m: (_write(t, "trained_best.pt", b"weeks of training"),
                   ["--model", "resnet18", "--blocks", "4", *SMALL, "--save", str(t / "trained_best.pt")])[1],
     ["--save", "trained_best.pt already exists; pass --overwrite to replace it"]),
    ("checkpoint-is-folder", export_main,
     lambda t, m: (_checkpoint(t), [str(t), "--out", str(t / "m.onnx")])[1],
     ["is a folder; it holds", "pass one of them"]),
    ("export-out-not-writable", export_main, lambda t, m: [str(_checkpoint(t)), "--out", "/proc/x.onnx"],
     ["cannot write /proc/x.onnx", "choose another path"]),
    ("model-kwargs-not-taken", convert_main,
     lambda t, m: ["--model", "resnet18", "--blocks", "3", *SMALL, "--model-kwargs", "foo=1"],
     ["resnet18 cannot be made with foo=1", "drop the keyword it does not take"]),
    ("checkpoint-other-architecture", convert_main,
     lambda t, m: (torch.save(timm.create_model("resnet18").state_dict(), t / "w.pth"),
                   ["--model", "resnet34", "--blocks", "3", *SMALL, "--checkpoint", str(t / "w.pth")])[1],
     ["do not load into resnet34", "give weights of that architecture"]),
    ("export-custom-model", export_main, lambda t, m: [str(_custom_checkpoint(t)), "--out", str(t / "m.onnx")],
     ["'Sequential' is not a timm model", "load_auglocal(path, model=Sequential(...))", "export_onnx(net"]),
    ("num-classes-beyond-memory", convert_main,
     lambda t, m: ["--model", "resnet18", "--blocks", "3", *SMALL, "--num-classes", "1000000000"],
     ["resnet18 with num_classes=1000000000 does not fit in memory", "give smaller settings"]),
    ("recipe-image-size-not-the-models", train_main,
     lambda t, m: [_recipe(t, model={"name": "vit_tiny_patch16_224"}, **{"data.image_size": 32})],
     ["the input size that recipe keys model.in_chans and data.image_size give, (3, 32, 32) does not run",
      "set model.img_size to data.image_size"]),
    ("vit-size-own-data", train_main,
     lambda t, m: [_recipe(t, model={"name": "vit_tiny_patch16_224"},
                           data={"dataset": "own_model_fixture:blobs", "num_workers": 0})],
     ["the input size of recipe key data.dataset's samples, (3, 8, 8) does not run",
      "Input height (8) doesn't match model (224)", "set model.img_size, or the keyword your factory takes"]),
    ("resume-longer-schedule", train_main,
     lambda t, m: (train_main([_recipe(t)]), [_recipe(t), "--resume", "auto", "--set", "epochs=2"])[1],
     ["cannot resume", "cosine schedule was made for epochs = 1", "--set model.checkpoint="]),
    ("resume-changes-the-run", train_main,
     lambda t, m: (train_main([_recipe(t)]), [_recipe(t), "--resume", "auto", "--set", "optimizer.lr=0.5"])[1],
     ["cannot resume", "this recipe changes what the run computes (optimizer.lr", "-> 0.5)", "--set model.checkpoint="]),
    ("resume-missing", train_main, lambda t, m: [_recipe(t), "--resume", str(t / "missing.pt")],
     ["cannot resume from", "missing.pt: no such file; give a run's last.pt", "--resume auto"]),
    ("recipe-is-run-output", train_main, lambda t, m: _recipe_in_output(t),
     ["is an input of this run, and the run writes recipe.yaml", "rename the recipe or write to another folder"]),
    ("recipe-duplicate-key", train_main, lambda t, m: _duplicate_key(t),
     ["gives key 'epochs' twice (lines", "keep one of them"]),
    ("stages-above-blocks", convert_main, lambda t, m: ["--model", "resnet18", "--blocks", "4", *SMALL, "--stages", "5"],
     ["--stages 5 is more pipeline stages than the 4 block(s) the plan has; use at most 4"]),
    ("model-name-and-factory", train_main, lambda t, m: [_recipe(t, model={"name": "resnet18", "factory": "a.b:c"})],
     ["recipe keys model.name ('resnet18') and model.factory ('a.b:c') are both given; keep one"]),
    ("classes-below-the-data", train_main, lambda t, m: [_own(t, **{"model.num_classes": 2, "conversion.blocks": 3})],
     ["the recipe gives 2 classes (model.num_classes or model.kwargs.num_classes) but", "has 4", "give at least 4"]),
    ("label-past-the-scores", train_main,
     lambda t, m: [_own(t, dataset="own_model_fixture:mislabelled", **{"conversion.blocks": 3})],
     ["a training label is 4 but the model gives 4 class scores (labels 0 to 3)", "at least 5 outputs"]),
    ("model-checkpoint-other-architecture", train_main, lambda t, m: [_recipe(t, **{"model.checkpoint": _resnet18_weights(t)})],
     ["recipe key model.checkpoint", "holds weights of another model than", "of another shape, e.g. conv1.weight [64, 3, 7, 7]",
      "missing, e.g.", "give weights of this architecture"]),
    ("factory-not-importable", train_main, lambda t, m: [_own(t, model="no_such_package.models:make")],
     ["recipe key model.factory 'no_such_package.models:make': module no_such_package.models cannot be imported",
      "check PYTHONPATH"]),
    ("factory-not-found", train_main, lambda t, m: [_own(t, model="own_model_fixture:smal_cnn")],
     ["own_model_fixture has no attribute 'smal_cnn'; did you mean small_cnn?"]),
    ("factory-not-callable", train_main, lambda t, m: [_own(t, model="own_model_fixture:NOT_CALLABLE")],
     ["'own_model_fixture:NOT_CALLABLE' is an int, not callable"]),
    ("factory-not-a-module", train_main, lambda t, m: [_own(t, model="own_model_fixture:not_a_module")],
     ["'own_model_fixture:not_a_module' returned a dict, not an nn.Module"]),
    ("factory-kwargs-not-taken", train_main, lambda t, m: [_own(t, **{"model.kwargs": {"depth": 3}})],
     ["cannot be called with depth=3", "give the keywords it takes in model.kwargs"]),
    ("factory-raises", train_main, lambda t, m: [_own(t, **{"model.kwargs": {"width": 0.5}})],
     ["recipe key model.factory 'own_model_fixture:small_cnn' raised", "when called with width=0.5",
      "fix model.kwargs or the function"]),
    ("dataset-not-splits", train_main, lambda t, m: [_own(t, dataset="own_model_fixture:one_dataset")],
     ["returned a Blobs; return (train, test) or (train, val, test) Datasets"]),
    ("dataset-not-pairs", train_main, lambda t, m: [_own(t, dataset="own_model_fixture:unlabelled")],
     ["a train sample is a Tensor; samples are (input, label) pairs"]),
    ("dataset-classes-unknown", train_main,
     lambda t, m: [_own(t, model="own_model_fixture:token_classifier", dataset="own_model_fixture:token_ids")],
     ["the number of classes is unknown; set recipe key model.num_classes, or give the training set a classes"]),
    ("val-split-leaves-none", train_main, lambda t, m: [_own(t, **{"data.val_split": 64})],
     ["recipe key data.val_split = 64 holds out 64 of own_model_fixture:blobs's 64 training images, leaving none"]),
    ("export-factory-not-importable", export_main,
     lambda t, m: [str(_factory_checkpoint(t)), "--out", str(t / "m.onnx")],
     ["own.pt was made by model factory 'no_such_package.models:small_cnn': module no_such_package.models cannot "
      "be imported", "check PYTHONPATH"]),
]


@pytest.mark.parametrize("main,argv,words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_error(tmp_path, capsys, monkeypatch, main, argv, words):
    args = argv(tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert ": error: " in err
    for w in words:
        assert w in err, err


def test_non_finite_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from auglocal_fx.training.state import read_training

    assert train_main(_nan_loss(tmp_path, monkeypatch)) == 2
    assert read_training(tmp_path / "run" / "last.pt")["train"]["epoch"] == 1


class _BatchOfOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        assert x.shape[0] == 1, "one sample at a time"
        return self.fc(x)


# API-only errors (no CLI takes an arbitrary nn.Module); ids untraceable-model, export-untraceable,
# export-unsupported-op, export-parity
def test_untraceable_model_is_one_line():
    with pytest.raises(AugLocalError, match="torch.fx cannot trace _DataDependent") as err:
        to_auglocal(_DataDependent(), 2, input_size=(4,))
    assert "\n" not in str(err.value)
    assert "(torch.export, tried next: " in str(err.value)  # auto tried the second front end too


def test_export_untraceable_is_one_line():
    with pytest.raises(AugLocalError, match=r"^torch.export cannot trace _BatchOfOne: in _BatchOfOne.forward: "
                                            r"AssertionError: one sample at a time") as err:
        to_auglocal(_BatchOfOne(), 1, input_size=(4,), frontend="export")
    assert "\n" not in str(err.value)
    assert "batch axis free" in str(err.value)


class _PicksEndTokens(nn.Module):
    """Reads the hidden state at each sequence's end token, as BART's classifier does: a boolean mask
    whose count depends on the token values."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids):
        h = self.lin(self.emb(ids))
        return self.head(h[ids == 2].view(ids.shape[0], -1, 8)[:, -1])


def test_a_value_dependent_size_export_guards_is_one_line_naming_the_inputs():
    with pytest.raises(AugLocalError, match=r"^the example inputs \(\(1, 3\) int64\) do not run: node '_assert_scalar") as err:
        to_auglocal(_PicksEndTokens(), 2, example_inputs=torch.tensor([[1, 3, 2]]), frontend="export")
    assert "\n" not in str(err.value)
    assert "torch.export traced a batch of two; this size depends on the input's values" in str(err.value)


def test_export_unsupported_op_is_one_line(tmp_path):
    with pytest.raises(AugLocalError, match="ONNX has no translation for prims.bessel_j0") as err:
        export_onnx(_Bessel(), tmp_path / "m.onnx", input_size=(2, 4, 4))
    assert "\n" not in str(err.value)
    assert "both exporters failed" in str(err.value)  # auto tried dynamo, then torchscript
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


def test_export_parity_failure_is_one_line_with_the_figure(tmp_path):
    with pytest.raises(AugLocalError, match=r"differs from PyTorch by \S+ \(> 1e-30\); not written") as err:
        mlp = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3))  # float sums never match to 1e-30
        export_onnx(mlp, tmp_path / "m.onnx", input_size=(256,), atol=1e-30)
    assert "\n" not in str(err.value)


def test_library_errors_name_python_parameters():
    """The same mistake reads ``blocks=99`` in Python, ``--blocks 99`` in the CLI (test_cli_error) and
    ``recipe key conversion.blocks = 99`` in a recipe (recipe-blocks-above-layers)."""
    with pytest.raises(AugLocalError, match=r"^blocks=99 is out of range for resnet20_cifar \(it has 10 layers\): use 1\.\.10$") as err:
        to_auglocal(timm.create_model("resnet20_cifar"), blocks=99, input_size=(3, 16, 16))
    assert err.value.param == "blocks"
    assert err.value.worded({"blocks": "--blocks"}).startswith("--blocks 99 is out of range")


def test_errors_chain_their_cause(tmp_path):
    """A user error caused by another exception keeps it as ``__cause__`` (raise ... from exc)."""
    bad = tmp_path / "c.pt"
    bad.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(AugLocalError, match="unreadable or corrupt") as err:
        load_auglocal(bad)
    assert err.value.__cause__ is not None
    with pytest.raises(AugLocalError, match="torch.fx cannot trace") as err:
        to_auglocal(_DataDependent(), 2, input_size=(4,))
    assert err.value.__cause__ is not None
