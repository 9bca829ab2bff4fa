"""Nothing a user wrote is destroyed, and a recipe says one thing: a run never writes over its own
recipe, a run that fails to start leaves no empty folder, a recipe that gives a key twice is refused."""

from __future__ import annotations

import yaml
from test_training import tiny_recipe, write_recipe

from auglocal_fx.cli.train import main as train_main


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_a_run_never_writes_over_its_own_recipe(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    recipe = tiny_recipe(tmp_path, output=str(exp))
    path = exp / "recipe.yaml"
    text = "# my notes\n" + yaml.safe_dump(recipe)
    path.write_text(text)
    assert train_main([str(path), "--stop-after", "1"]) == 2
    err = _one_line_error(capsys)
    assert f"{path} is an input of this run" in err and "recipe.yaml" in err
    assert path.read_text() == text  # comments and all
    assert train_main([str(path), "--overwrite"]) == 2  # not even when told to replace the run
    assert path.read_text() == text


def test_a_run_that_fails_to_start_leaves_no_folder(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, output=str(tmp_path / "new"))
    assert train_main([str(write_recipe(tmp_path, recipe)), "--resume", str(tmp_path / "missing.pt")]) == 2
    _one_line_error(capsys)
    assert not (tmp_path / "new").exists()


def test_a_recipe_that_gives_a_key_twice_is_refused(tmp_path, capsys):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    path.write_text(path.read_text() + "batch_size: 64\n")  # batch_size is already given above
    assert train_main([str(path), "--print-recipe"]) == 2
    err = _one_line_error(capsys)
    assert "gives key 'batch_size' twice (lines" in err and "keep one of them" in err


def test_a_run_starts_from_the_weights_model_checkpoint_names(tmp_path):
    import torch

    from auglocal_fx.training import load_recipe
    from auglocal_fx.training.build import build_run
    from auglocal_fx.training.distributed import Env

    recipe = tiny_recipe(tmp_path, epochs=1)
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 0
    last = tmp_path / "run" / "last.pt"
    again = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path, **{"model.checkpoint": str(last)}), "b.yaml"))
    run = build_run(again, Env(0, 1, torch.device("cpu")))
    trained = torch.load(last, weights_only=True)["model_state"]
    assert all(torch.equal(v, trained[k]) for k, v in run.net.model.state_dict().items())


def test_resuming_from_an_earlier_epoch_says_what_it_trains_again(tmp_path, capsys):
    """A copy of epoch 1's checkpoint (as best.pt is when accuracy peaked early), resumed after the run
    finished epoch 2: the log says epoch 2 is trained again and last.pt replaced, before it happens."""
    import shutil

    path = str(write_recipe(tmp_path, tiny_recipe(tmp_path, epochs=2)))
    run = tmp_path / "run"
    assert train_main([path, "--stop-after", "1"]) == 0
    shutil.copy(run / "last.pt", run / "epoch1.pt")
    assert train_main([path, "--resume", "auto"]) == 0
    capsys.readouterr()
    assert train_main([path, "--resume", str(run / "epoch1.pt")]) == 0
    out = capsys.readouterr()
    assert (f"note: {run / 'last.pt'} holds epoch 2; resuming from epoch1.pt (epoch 1) trains epochs 2-2 again "
            "and replaces it") in out.out + out.err


def test_keep_checkpoints_keeps_the_newest_epochs_and_a_kept_one_resumes(tmp_path, capsys):
    import torch

    path = str(write_recipe(tmp_path, tiny_recipe(tmp_path, epochs=4, keep_checkpoints=3)))
    run = tmp_path / "run"
    assert train_main([path]) == 0
    assert sorted(p.name for p in run.glob("epoch-*.pt")) == ["epoch-0002.pt", "epoch-0003.pt", "epoch-0004.pt"]
    for epoch in (2, 3, 4):
        assert torch.load(run / f"epoch-{epoch:04d}.pt", weights_only=True)["train"]["epoch"] == epoch
    third = torch.load(run / "epoch-0003.pt", weights_only=True)["model_state"]
    capsys.readouterr()
    # epoch 3 again from a kept epoch, exactly; epoch 4's file belongs to the run left behind: gone
    assert train_main([path, "--resume", str(run / "epoch-0002.pt"), "--stop-after", "3"]) == 0
    assert "trains epochs 3-4 again" in capsys.readouterr().out
    assert sorted(p.name for p in run.glob("epoch-*.pt")) == ["epoch-0002.pt", "epoch-0003.pt"]
    again = torch.load(run / "epoch-0003.pt", weights_only=True)["model_state"]
    assert all(torch.equal(third[k], again[k]) for k in third)


def test_check_builds_the_run_and_writes_nothing_and_checks_a_resume(tmp_path, capsys):
    path = str(write_recipe(tmp_path, tiny_recipe(tmp_path, epochs=2)))
    assert train_main([path, "--check"]) == 0
    assert "recipe OK: resnet20_cifar as 4 auglocal blocks" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    assert train_main([path, "--stop-after", "1"]) == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    capsys.readouterr()
    assert train_main([path, "--check", "--resume", "auto"]) == 0
    assert train_main([path, "--check", "--resume", "auto", "--set", "optimizer.lr=0.5"]) == 2
    assert "cannot resume" in _one_line_error(capsys)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
