"""auglocal-eval: a checkpoint on its recipe's splits, or on changed data keys, as the trainer measured it."""

from __future__ import annotations

import json

import pytest
from test_training import tiny_recipe, write_recipe

from auglocal_fx.cli.evaluate import main as eval_main
from auglocal_fx.cli.train import main as train_main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    assert train_main([str(write_recipe(tmp, tiny_recipe(tmp, epochs=1, **{"data.val_split": 32})))]) == 0
    return tmp / "run"


def test_best_pt_scores_what_the_run_reported(run, capsys, tmp_path):
    summary = json.loads((run / "summary.json").read_text())
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    out = tmp_path / "test.json"
    assert eval_main([str(run / "best.pt"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["acc"] == pytest.approx(summary["test_acc"], abs=1e-12) and r["split"] == "test"
    assert "accuracy" in capsys.readouterr().out
    assert eval_main([str(run / "best.pt"), "--split", "val"]) == 0
    line = capsys.readouterr().out
    assert f"accuracy {100 * record['val_acc']:.2f}%, loss {record['val_loss']:.4f}" in line
    assert "aux heads " + " ".join(f"{100 * a:.1f}" for a in record["aux_val_acc"]) in line
    assert eval_main([str(run / "best.pt"), "--out", str(out)]) == 2  # not written over without --overwrite


def test_changed_data_keys_and_one_line_refusals(run, capsys):
    assert eval_main([str(run / "last.pt"), "--set", "data.test_limit=16"]) == 0
    assert "16 images" in capsys.readouterr().out
    assert eval_main([str(run / "last.pt"), "--set", "model.kwargs.num_classes=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "auglocal-eval: error:" in err
    assert eval_main([str(run / "missing.pt")]) == 2
