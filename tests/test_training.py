"""auglocal-train: recipes, one short run per rule, exact resume, and 2-process DDP on gloo.

Runs use the synthetic dataset at 16 px with a ResNet-20 for 32x32 inputs, so each takes seconds.
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

from auglocal_fx import load_auglocal
from auglocal_fx.cli.train import main as train_main
from auglocal_fx.errors import AugLocalError
from auglocal_fx.training import load_recipe, train
from auglocal_fx.training.data import DATASETS
from auglocal_fx.training.datasets import IdxImages

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def tiny_recipe(tmp_path: Path, rule: str = "auglocal", **over) -> dict:
    recipe = {
        "model": {"name": "resnet20_cifar"},
        "data": {"dataset": "synthetic", "image_size": 16, "train_limit": 128, "test_limit": 64,
                 "num_workers": 0},
        "conversion": {"rule": rule, "blocks": 4, "aux_depth": 2, "pyramid": 0.5},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "epochs": 2,
        "batch_size": 32,
        "seed": 3,
        "device": "cpu",
        "output": str(tmp_path / "run"),
    }
    for key, value in over.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe


def write_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- recipes -------------------------------------------------------------------------------------
def test_shipped_recipes_validate():
    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert {"fashion_mnist_auglocal.yaml", "fashion_mnist_dgl.yaml", "fashion_mnist_bp.yaml",
            "cifar10_resnet32_auglocal.yaml", "cifar10_resnet110_auglocal.yaml",
            "imagenet_resnet34_auglocal.yaml"} <= set(names)
    recipes = {p.stem: load_recipe(p) for p in RECIPES.glob("*.yaml")}
    assert {recipes[f"fashion_mnist_{r}"].conversion.rule for r in ("bp", "dgl", "auglocal")} == {"bp", "dgl",
                                                                                                    "auglocal"}
    r32 = recipes["cifar10_resnet32_auglocal"]
    assert (r32.model.name, r32.conversion.blocks, r32.conversion.aux_depth, r32.conversion.pyramid,
            r32.conversion.tail) == ("resnet32_cifar", 16, 2, 0.5, "reference")
    assert (r32.optimizer.name, r32.optimizer.lr, r32.optimizer.nesterov, r32.optimizer.weight_decay,
            r32.batch_size, r32.epochs, r32.schedule.name) == ("sgd", 0.8, True, 1e-4, 1024, 400, "cosine")
    assert r32.schedule.warmup_epochs > 0
    r110 = recipes["cifar10_resnet110_auglocal"]
    assert (r110.model.name, r110.conversion.blocks, r110.conversion.aux_depth) == ("resnet110_cifar", 55, 3)
    r34 = recipes["imagenet_resnet34_auglocal"]
    assert (r34.model.name, r34.conversion.blocks, r34.conversion.aux_depth) == ("resnet34", 17, 4)


def test_fashion_mnist_recipes_differ_only_in_rule():
    dicts = {r: load_recipe(RECIPES / f"fashion_mnist_{r}.yaml").to_dict() for r in ("bp", "dgl", "auglocal")}
    for d in dicts.values():
        d["conversion"].pop("rule")
        d.pop("output")
    assert dicts["bp"] == dicts["dgl"] == dicts["auglocal"]


def test_set_overrides_parse_yaml_values(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    r = load_recipe(path, ["optimizer.lr=1e-3", "bf16=true", "conversion.rule=dgl", "optimizer.betas=[0.8, 0.9]"])
    assert (r.optimizer.lr, r.bf16, r.conversion.rule, r.optimizer.betas) == (1e-3, True, "dgl", [0.8, 0.9])


def test_output_defaults_to_runs_and_recipe_name(tmp_path):
    recipe = tiny_recipe(tmp_path)
    del recipe["output"]
    assert load_recipe(write_recipe(tmp_path, recipe, "my_run.yaml")).output == os.path.join("runs", "my_run")


BAD_RECIPES = [
    # (change to the tiny recipe, words the one-line error must contain)
    ({"modle": {"name": "x"}}, ["unknown recipe key modle", "did you mean model"]),
    ({"optimizer.lrr": 0.1}, ["unknown recipe key optimizer.lrr", "did you mean lr"]),
    ({"epochs": "ten"}, ["recipe key epochs must be an integer", "'ten'"]),
    ({"optimizer.lr": "fast"}, ["recipe key optimizer.lr must be a number"]),
    ({"bf16": "yes"}, ["recipe key bf16 must be true or false"]),
    ({"conversion.rule": "hebbian"}, ["recipe key conversion.rule = 'hebbian' is not a rule",
                                      "auglocal, bp, dgl, infopro, predsim"]),
    ({"data.dataset": "mnist"}, ["recipe key data.dataset", "fashion_mnist"]),
    # planning options: checked by PlanConfig, in the recipe's words (options.py)
    ({"conversion.blocks": 0}, ["recipe key conversion.blocks = 0 is not a number of blocks"]),
    ({"conversion.pyramid": 1.5}, ["recipe key conversion.pyramid = 1.5 is outside [0, 1]"]),
    ({"conversion.aux_depth": -1}, ["recipe key conversion.aux_depth = -1 is not an integer >= 0"]),
    ({"model": "resnet20_cifar"}, ["recipe key model must be a mapping"]),
    # values that ran and meant something else, or failed deep in torch with a traceback
    ({"data.train_limit": 0}, ["recipe key data.train_limit must be at least 1, got 0", "0 does not mean all",
                               "leave the key out"]),
    ({"data.train_limit": -3}, ["recipe key data.train_limit must be at least 1, got -3"]),
    ({"data.test_limit": 0}, ["recipe key data.test_limit must be at least 1"]),
    ({"eval_batch_size": 0}, ["recipe key eval_batch_size must be at least 1, got 0", "batch_size"]),
    ({"optimizer.lr": -0.1}, ["recipe key optimizer.lr must be above 0, got -0.1"]),
    ({"optimizer.lr": float("nan")}, ["recipe key optimizer.lr must be a finite number"]),
    ({"data.num_workers": -1}, ["recipe key data.num_workers must be 0 or more, got -1"]),
    ({"model.num_classes": 0}, ["recipe key model.num_classes must be at least 2, got 0"]),
    ({"data.image_size": 0}, ["recipe key data.image_size must be at least 1"]),
    ({"schedule.warmup_start_factor": 2}, ["recipe key schedule.warmup_start_factor must be at most 1"]),
    ({"optimizer.betas": [0.9]}, ["recipe key optimizer.betas must be two numbers in [0, 1)"]),
]


@pytest.mark.parametrize("change,words", BAD_RECIPES, ids=[next(iter(c)) for c, _ in BAD_RECIPES])
def test_bad_recipe_is_one_line_exit_2(tmp_path, capsys, change, words):
    recipe = tiny_recipe(tmp_path)
    for key, value in change.items():
        if key in recipe or "." in key:
            recipe = tiny_recipe(tmp_path, **{key: value})
        else:
            recipe[key] = value
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("missing", ["epochs", "model", "data", "batch_size"])
def test_missing_key_names_it(tmp_path, capsys, missing):
    recipe = tiny_recipe(tmp_path)
    del recipe[missing]
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 2
    assert f"recipe key {missing} is missing" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing file", "not yaml", "not a mapping", "bad --set", "no model.name"])
def test_recipe_file_errors(tmp_path, capsys, case):
    path = tmp_path / "r.yaml"
    args = []
    if case == "not yaml":
        path.write_text("model: {name: [unclosed\n")
    elif case == "not a mapping":
        path.write_text("- just\n- a list\n")
    elif case == "bad --set":
        write_recipe(tmp_path, tiny_recipe(tmp_path), "r.yaml")
        args = ["--set", "epochs"]
    elif case == "no model.name":
        write_recipe(tmp_path, tiny_recipe(tmp_path, **{"model": {}}), "r.yaml")
    assert train_main([str(path), *args]) == 2
    err = capsys.readouterr().err.strip()
    expected = {"missing file": "does not exist", "not yaml": "is not valid YAML at line",
                "not a mapping": "must be a YAML mapping", "bad --set": "is not key=value",
                "no model.name": "recipe key model.name is missing"}[case]
    assert expected in err and "\n" not in err


def test_print_recipe_shows_defaults(tmp_path, capsys):
    assert train_main([str(write_recipe(tmp_path, tiny_recipe(tmp_path))), "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["conversion"]["balance"] == "layers" and printed["optimizer"]["nesterov"] is True


# -- data ----------------------------------------------------------------------------------------
def _write_idx(path: Path, array: torch.Tensor) -> None:
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def test_idx_reader_reads_fashion_mnist_layout(tmp_path):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    ds = IdxImages(str(tmp_path), train=False, transform=None)
    assert len(ds) == 5
    img, label = ds[2]
    assert label == 4
    assert torch.equal(torch.as_tensor(img).reshape(28, 28), images[2])  # a 1 x 28 x 28 uint8 image


def test_fewer_classes_than_the_dataset_is_refused(tmp_path, capsys):
    """A label past the last logit made cross-entropy fail mid-epoch with a traceback."""
    for split, n in (("train", 8), ("t10k", 4)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", torch.zeros(n, 28, 28))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", (torch.arange(n) + 6) % 10)  # labels 6..9 and 0..3
    recipe = tiny_recipe(tmp_path, epochs=1, batch_size=4, **{
        "data": {"dataset": "fashion_mnist", "root": str(tmp_path), "num_workers": 0},
        "model.num_classes": 5, "model.in_chans": 1})
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 2
    err = capsys.readouterr().err.strip()
    assert "recipe key model.num_classes is 5 but fashion_mnist has 10 classes" in err and "\n" not in err


def test_missing_fashion_mnist_says_how_to_install(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, **{"data": {"dataset": "fashion_mnist", "root": str(tmp_path / "nowhere")}})
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 2
    err = capsys.readouterr().err
    assert "fashion_mnist not found" in err and "apt-get install dataset-fashion-mnist" in err
    assert "download: true" in err


# -- training runs -------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["auglocal", "dgl", "bp", "infopro", "predsim"])
def test_short_run_per_rule(tmp_path, capsys, rule):
    recipe = tiny_recipe(tmp_path, rule, epochs=1)
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 0
    out = Path(recipe["output"])
    assert "test accuracy" in capsys.readouterr().out
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png", "summary.json", "recipe.yaml"):
        assert (out / name).is_file(), name
    (record,) = history(out)
    assert record["epoch"] == 1 and len(record["step_losses"]) == 4
    assert all(torch.isfinite(torch.tensor(record["step_losses"])))
    assert record["images_per_s"] > 0 and record["epoch_time_s"] > 0 and isinstance(record["lr"], float)
    n_aux = 0 if rule == "bp" else 3
    assert len(record["aux_val_acc"]) == len(record["local_losses"]) == n_aux  # one per aux head
    assert "test_acc" not in record  # the test set is evaluated once, on best.pt, in the summary
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rule"] == rule and summary["epochs_done"] == 1 and summary["selected_on"] == "val"
    assert len(summary["aux_test_acc"]) == n_aux and 0 <= summary["test_acc"] <= 1
    # the checkpoint rebuilds the trained net (bp: the whole model is one block) with the trained weights
    net = load_auglocal(out / "last.pt")
    assert (len(net.blocks), len(net.aux)) == (1 if rule == "bp" else 4, n_aux)
    assert net.image_stats == DATASETS["synthetic"].stats  # what the loader normalised with (infopro restores it)
    saved = torch.load(out / "last.pt", weights_only=False)["model_state"]
    assert all(torch.equal(v, saved[k]) for k, v in net.model.state_dict().items())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net.eval()(x), net.model.eval()(x), rtol=0, atol=0)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_equals_uninterrupted_run(tmp_path):
    full = tiny_recipe(tmp_path / "a", epochs=3)
    assert train_main([str(write_recipe(tmp_path, full, "full.yaml"))]) == 0
    split = tiny_recipe(tmp_path / "b", epochs=3)
    path = write_recipe(tmp_path, split, "split.yaml")
    assert train_main([str(path), "--stop-after", "1"]) == 0
    assert len(history(Path(split["output"]))) == 1
    assert train_main([str(path), "--resume", str(Path(split["output"]) / "last.pt")]) == 0
    a, b = history(Path(full["output"])), history(Path(split["output"]))
    assert [h["step_losses"] for h in a] == [h["step_losses"] for h in b]  # exactly, on CPU
    assert [h["val_acc"] for h in a] == [h["val_acc"] for h in b]
    sa = torch.load(Path(full["output"]) / "last.pt", weights_only=False)["model_state"]
    sb = torch.load(Path(split["output"]) / "last.pt", weights_only=False)["model_state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_refuses_another_conversion(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, epochs=1)
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 0
    last = str(Path(recipe["output"]) / "last.pt")
    assert train_main([str(write_recipe(tmp_path, recipe)), "--set", "conversion.blocks=3", "--resume", last]) == 2
    assert "conversion.blocks = 4, this recipe says 3" in capsys.readouterr().err


@pytest.mark.parametrize("changes, listed", [
    (["optimizer.lr=0.5"], "optimizer.lr 0.05 -> 0.5"),
    (["batch_size=16"], "batch_size 32 -> 16"),  # a cosine schedule counted in the old steps
    (["label_smoothing=0.5", "clip_grad=1e-9"], "label_smoothing 0.0 -> 0.5, clip_grad null -> 1.0e-09"),
    (["seed=4", "threads=1"], "seed 3 -> 4)"),  # only what changes the run is listed
])
def test_resume_refuses_every_key_that_changes_what_the_run_computes(tmp_path, capsys, changes, listed):
    """A resume is the recorded run or a refusal naming each change; the run folder's recipe.yaml
    keeps saying what the run used."""
    recipe = tiny_recipe(tmp_path, epochs=2)
    path, out = str(write_recipe(tmp_path, recipe)), Path(recipe["output"])
    assert train_main([path, "--stop-after", "1"]) == 0
    kept = (out / "recipe.yaml").read_text()
    capsys.readouterr()
    sets = [a for c in changes for a in ("--set", c)]
    assert train_main([path, "--resume", "auto", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "changes what the run computes" in err and listed in err, err
    assert "--set model.checkpoint=" in err
    assert (out / "recipe.yaml").read_text() == kept


def test_resume_may_change_how_the_run_goes_and_says_so(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, epochs=2)
    path, out = str(write_recipe(tmp_path, recipe)), Path(recipe["output"])
    assert train_main([path, "--stop-after", "1"]) == 0
    capsys.readouterr()
    assert train_main([path, "--resume", "auto", "--set", "threads=1", "--set", "log_interval=7"]) == 0
    assert "resuming with threads: null -> 1; log_interval: 50 -> 7" in capsys.readouterr().out
    assert [h["epoch"] for h in history(out)] == [1, 2]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["threads"] == 1  # what the run now uses


def test_second_run_into_a_used_folder_is_refused(tmp_path, capsys):
    """Another model, or the same recipe without --resume, would have replaced best.pt and last.pt."""
    recipe = tiny_recipe(tmp_path, epochs=1)
    path = str(write_recipe(tmp_path, recipe))
    out = Path(recipe["output"])
    assert train_main([path]) == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    capsys.readouterr()
    for extra in ([], ["--set", "conversion.blocks=3"], ["--resume", str(tmp_path / "elsewhere.pt")]):
        assert train_main([path, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert f"output folder {out} already holds a run (last.pt, best.pt)" in err, err
        assert "--resume auto" in err and "--overwrite" in err and "\n" not in err
    assert {name: (out / name).read_bytes() for name in before} == before  # untouched
    # in Python, the same refusal in Python's words
    with pytest.raises(AugLocalError, match=r"resume='.*last\.pt'.*overwrite=True"):
        train(load_recipe(path))
    # a longer run cannot resume: the cosine schedule was made for 1 epoch (the lr would jump back up) ...
    assert train_main([path, "--resume", "auto", "--set", "epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "cosine schedule was made for epochs = 1" in err and "--set model.checkpoint=" in err, err
    # ... it trains on from the weights, under the new schedule, in a new run
    longer = ["--set", "epochs=2", "--set", f"model.checkpoint={out / 'last.pt'}", "--set", f"output={tmp_path / 'on'}"]
    assert train_main([path, *longer]) == 0
    assert [h["epoch"] for h in history(tmp_path / "on")] == [1, 2]
    # --overwrite replaces it: another conversion, its history starts again
    assert train_main([path, "--overwrite", "--set", "conversion.blocks=3"]) == 0
    assert [h["epoch"] for h in history(out)] == [1]
    assert len(load_auglocal(out / "best.pt").blocks) == 3


def test_overwrite_leaves_no_stale_checkpoint(tmp_path, capsys):
    """--overwrite deletes the old run first: a new run that fails before its first checkpoint must not
    leave the old last.pt for --resume auto to continue under the new recipe."""
    recipe = tiny_recipe(tmp_path, epochs=1)
    path = str(write_recipe(tmp_path, recipe))
    assert train_main([path]) == 0
    nan = ["--set", "optimizer.lr=1e30", "--set", "schedule.name=constant", "--set", "schedule.warmup_epochs=0"]
    assert train_main([path, "--overwrite", *nan]) == 2
    assert "loss of block" in capsys.readouterr().err
    assert not any((Path(recipe["output"]) / name).exists() for name in ("last.pt", "best.pt", "metrics.jsonl"))


def test_same_seed_same_losses(tmp_path):
    runs = []
    for name in ("x", "y"):
        recipe = tiny_recipe(tmp_path / name, epochs=1)
        assert train_main([str(write_recipe(tmp_path, recipe, f"{name}.yaml"))]) == 0
        runs.append(history(Path(recipe["output"]))[0]["step_losses"])
    assert runs[0] == runs[1]


def test_ctrl_c_says_how_to_continue(monkeypatch, capsys):
    from auglocal_fx.cli import train as cli

    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_main", interrupted)
    assert cli.main([]) == 130
    assert "interrupted; the same command with --resume auto continues from the last finished epoch" in \
        capsys.readouterr().err


def test_output_not_writable(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, output="/proc/auglocal-cannot-write-here")
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_non_finite_loss_names_block(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, epochs=1, **{"optimizer.lr": 1e30, "schedule.name": "constant",
                                                "schedule.warmup_epochs": 0})
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 2
    err = capsys.readouterr().err
    assert "loss of block" in err and "lower optimizer.lr" in err


# -- distributed ---------------------------------------------------------------------------------
def test_two_process_gloo_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) follows the single-process loss curve at the same global batch.

    GroupNorm and no augmentation make every sample's computation independent of how the batch is
    split, so the only difference left is the order of floating-point sums in the all-reduce.
    """
    common = {"model.kwargs": {"norm_layer": "groupnorm1"}, "data.augment": False}
    one = tiny_recipe(tmp_path / "one", **common)
    two = tiny_recipe(tmp_path / "two", **common)
    assert train_main([str(write_recipe(tmp_path, one, "one.yaml"))]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "auglocal_fx.cli.train", str(write_recipe(tmp_path, two, "two.yaml"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1  # only rank 0 reports
    a, b = history(Path(one["output"])), history(Path(two["output"]))
    assert len(a) == len(b) == 2
    for ha, hb in zip(a, b):
        assert len(ha["step_losses"]) == len(hb["step_losses"]) == 4
        torch.testing.assert_close(torch.tensor(hb["step_losses"]), torch.tensor(ha["step_losses"]),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(hb["local_losses"]), torch.tensor(ha["local_losses"]),
                                   rtol=1e-4, atol=1e-5)
        assert abs(ha["val_acc"] - hb["val_acc"]) <= 1 / 64


@pytest.mark.parametrize("name,layers", [("resnet32_cifar", 16), ("resnet110_cifar", 55)])
def test_resnet_cifar_plans_have_paper_layer_counts(name, layers):
    import timm

    from auglocal_fx import build_plan

    plan = build_plan(timm.create_model(name), layers, input_size=(3, 32, 32))
    assert len(plan.layers) == layers and len(plan.blocks) == layers


def test_load_recipe_raises_auglocal_error():
    with pytest.raises(AugLocalError, match="does not exist"):
        load_recipe("/nonexistent/recipe.yaml")


def test_a_folder_holding_the_users_files_is_refused_overwrite_or_not(tmp_path, capsys):
    """A run writes into a new or empty folder, or one a run made (its marker): a hand-written
    recipe.yaml and summary.json in a folder with no checkpoint were replaced without a word."""
    recipe = tiny_recipe(tmp_path, epochs=1)
    out = Path(recipe["output"])
    out.mkdir()
    mine = {"recipe.yaml": "# my notes\n", "summary.json": "{}\n"}
    for name, text in mine.items():
        (out / name).write_text(text)
    path = str(write_recipe(tmp_path, recipe))
    for extra in ([], ["--overwrite"]):
        assert train_main([path, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "holds files no run wrote (recipe.yaml, summary.json)" in err, err
        assert "--set output=DIR" in err
    assert {name: (out / name).read_text() for name in mine} == mine and sorted(os.listdir(out)) == sorted(mine)


def test_a_run_folder_in_use_is_refused_naming_the_process_that_holds_it(tmp_path, capsys):
    """Two runs into one folder: the second is refused while the first writes there; a lock whose
    holder is gone (a killed run) blocks nothing."""
    from auglocal_fx.training.run_folder import RunLock

    recipe = tiny_recipe(tmp_path, epochs=1)
    out = Path(recipe["output"])
    out.mkdir()
    path = str(write_recipe(tmp_path, recipe))
    first = RunLock(out, {"recipe": "first.yaml"})  # the first run, holding the folder
    try:
        assert train_main([path]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"output folder {out} is in use by another run (process {os.getpid()}" in err
        assert not (out / "last.pt").exists()
    finally:
        first.release()  # as when its process ends, however it ends
    assert train_main([path]) == 0
    assert (out / "last.pt").is_file()
