"""auglocal-convert, in-process through ``main(argv)`` plus one run of the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants as hub
import pytest
import timm
import torch

from auglocal_fx import AugLocalError, Plan, models, to_auglocal
from auglocal_fx.cli.convert import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("auglocal-convert: error: "), err
    assert "Traceback" not in err


def test_resnet50_json(capsys):
    rc, out, err = run(capsys, "--model", "resnet50", "--blocks", "16", "--format", "json")
    assert rc == 0, err
    data = json.loads(out)
    assert len(data["layers"]) == 17
    assert len(data["blocks"]) == 16
    assert [i for b in data["blocks"] for i in b["layers"]] == list(range(17))
    assert all(b["layers"] for b in data["blocks"])
    assert len(data["aux"]) == 15
    assert [a["block"] for a in data["aux"]] == list(range(15))
    assert data["config"]["model"] == "resnet50"
    assert "Traceback" not in err


def test_vit_json(capsys):
    rc, out, err = run(capsys, "--model", "vit_tiny_patch16_224", "--blocks", "12", "--format", "json")
    assert rc == 0, err
    data = json.loads(out)
    assert len(data["layers"]) == 13
    assert len(data["blocks"]) == 12
    assert [i for b in data["blocks"] for i in b["layers"]] == list(range(13))
    assert len(data["aux"]) == 11


def test_unknown_model_suggests(capsys):
    rc, out, err = run(capsys, "--model", "resnet51", "--blocks", "4")
    assert rc == 2
    assert_one_line_error(err)
    assert "resnet51" in err and "resnet50" in err
    assert out == ""


def test_blocks_out_of_range(capsys):
    rc, out, err = run(capsys, "--model", "resnet50", "--blocks", "40")
    assert rc == 2
    assert_one_line_error(err)
    assert "--blocks 40 is out of range for resnet50 (it has 17 layers): use 1..17" in err
    assert out == ""


def test_wrong_input_size_is_one_line_error(capsys):
    rc, out, err = run(capsys, "--model", "resnet50", "--blocks", "4", "--input-size", "1", "224", "224")
    assert rc == 2
    assert_one_line_error(err)
    assert "--input-size (1, 224, 224) does not run" in err  # the flag, not the Python parameter


def test_out_writes_plan_that_loads_back(capsys, tmp_path):
    dest = tmp_path / "sub" / "plan.yaml"
    rc, out, err = run(capsys, "--model", "resnet50", "--blocks", "3", "--balance", "flops",
                       "--format", "json", "--out", str(dest))
    assert rc == 0, err
    assert dest.is_file()
    from_file = Plan.from_yaml(dest.read_text())
    assert from_file == Plan.from_dict(json.loads(out))
    assert len(from_file.blocks) == 3
    assert from_file.config.balance == "flops"
    assert [i for b in from_file.blocks for i in b.layers] == list(range(17))
    assert str(dest) in err
    assert list(dest.parent.iterdir()) == [dest]  # no temp file left behind


def test_table_format(capsys):
    rc, out, err = run(capsys, "--model", "resnet50", "--blocks", "2")
    assert rc == 0, err
    assert "resnet50: 17 layers -> 2 blocks" in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) >= 3  # two blocks and the head
    assert "Traceback" not in err


def test_console_script_bad_model():
    exe = Path(sys.executable).parent / "auglocal-convert"
    assert exe.is_file(), f"console script missing: {exe} (pip install -e .)"
    proc = subprocess.run([str(exe), "--model", "resnet51", "--blocks", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_one_line_error(proc.stderr)
    assert "resnet50" in proc.stderr


def test_save_writes_a_checkpoint_load_auglocal_reads(capsys, tmp_path):
    from auglocal_fx import load_auglocal

    dest = tmp_path / "converted.pt"
    rc, out, err = run(capsys, "--model", "resnet18", "--blocks", "4", "--input-size", "3", "64", "64",
                       "--format", "json", "--save", str(dest))
    assert rc == 0, err
    printed = Plan.from_dict(json.loads(out))
    assert all(a.params > 0 and a.flops > 0 for a in printed.aux)  # aux columns filled
    net = load_auglocal(dest)
    assert net.plan == printed and len(net.blocks) == 4 and len(net.aux) == 3


def test_bundles_in_json_and_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # the wide table unsqueezed
    rc, out, err = run(capsys, "--model", "densenet121", "--blocks", "4", "--input-size", "3", "64", "64",
                       "--format", "json")
    assert rc == 0 and "note:" not in err
    layers = json.loads(out)["layers"]
    assert max(len(layer["crossing"]) for layer in layers) > 1  # tensors handed on at each layer boundary
    assert all(len(layer["crossing"]) == len(layer["crossing_dtypes"]) for layer in layers)
    rc, out, _ = run(capsys, "--model", "densenet121", "--blocks", "4", "--input-size", "3", "64", "64", "--wide")
    assert rc == 0 and "tensors" in out  # a column of the wide table


def test_coarse_split_is_one_note_line_naming_the_flag(capsys):
    rc, out, err = run(capsys, "--model", "densenet121", "--blocks", "2", "--max-bundle", "1",
                       "--input-size", "3", "64", "64", "--format", "json")
    assert rc == 0 and json.loads(out)["notes"]
    notes = [line for line in err.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("auglocal-convert: note: densenet121 splits into only"), err
    assert "tensors live across" in notes[0] and "--max-bundle 1" in notes[0] and "max_bundle=" not in notes[0]


# -- arguments that used to give a traceback or a silently wrong model --------------------------
def test_save_to_a_folder_is_refused_before_any_work(capsys, tmp_path):
    for flag in ("--save", "--out"):
        rc, out, err = run(capsys, "--model", "resnet18", "--blocks", "4", flag, str(tmp_path))
        assert rc == 2
        assert_one_line_error(err)
        assert f"{flag} {tmp_path} is a folder" in err
        assert out == ""  # refused before the table was printed


def test_num_classes_below_1_is_refused(capsys):
    """timm builds a model without its classifier for 0: its features would have been taken as logits."""
    for value in ("0", "-5"):
        rc, out, err = run(capsys, "--model", "resnet18", "--blocks", "4", "--num-classes", value)
        assert rc == 2
        assert_one_line_error(err)
        assert f"--num-classes {value} is not an integer >= 1" in err and out == ""


def test_to_auglocal_refuses_num_classes_0():
    with pytest.raises(AugLocalError, match=r"num_classes=0 is not an integer >= 1"):
        to_auglocal(timm.create_model("resnet18"), blocks=2, num_classes=0, input_size=(3, 32, 32))


def test_input_size_beyond_memory_is_refused(capsys):
    rc, out, err = run(capsys, "--model", "resnet18", "--blocks", "4", "--input-size", "3", "1000000", "1000000")
    assert rc == 2
    assert_one_line_error(err)
    assert "--input-size (3, 1000000, 1000000) needs 11,175.9 GiB for one float32 sample" in err


def _offline_hub(monkeypatch, cache: Path):
    """No network (the probe says so, whatever this machine has) and an HF cache at ``cache``."""
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)  # as without the variable: the probe decides


def test_pretrained_offline_fails_fast_in_one_line(capsys, monkeypatch, tmp_path):
    _offline_hub(monkeypatch, tmp_path)
    start = time.perf_counter()
    rc, out, err = run(capsys, "--model", "resnet18", "--blocks", "4", "--input-size", "3", "32", "32", "--pretrained")
    assert rc == 2
    assert_one_line_error(err)
    assert "pretrained weights for 'resnet18' are not in the local cache and huggingface.co cannot be reached" in err
    assert time.perf_counter() - start < 30  # was about a minute of hub retries


def test_pretrained_offline_loads_cached_weights(capsys, monkeypatch, tmp_path):
    """Weights in the local Hugging Face cache load without a network, as timm does online."""
    from safetensors.torch import save_file

    _offline_hub(monkeypatch, tmp_path)
    state = {k: v.clone().contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}
    state["fc.weight"].fill_(0.25)
    commit = "0" * 40
    repo = tmp_path / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(state, repo / "snapshots" / commit / "model.safetensors")
    model = models.create_model("test_resnet", pretrained=True)
    assert torch.all(model.fc.weight == 0.25)
    rc, out, err = run(capsys, "--model", "test_resnet", "--blocks", "2", "--pretrained", "--format", "json")
    assert rc == 0, err


# -- making the model as timm's scripts do -----------------------------------------------------------
def test_in_chans_and_img_size_plan_at_the_size_the_model_was_made_for(capsys):
    rc, out, err = run(capsys, "--model", "vit_tiny_patch16_224", "--blocks", "4", "--img-size", "64",
                       "--in-chans", "1", "--format", "json")
    assert rc == 0, err
    plan = Plan.from_dict(json.loads(out))
    assert plan.config.input_size == [1, 64, 64] and plan.layers[0].out_shape[0] == 17  # 4x4 patches + class token


def test_model_kwargs_and_a_local_checkpoint_reach_timm(capsys, tmp_path):
    weights = tmp_path / "r18.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), weights)
    save = tmp_path / "c.pt"
    rc, out, err = run(capsys, "--model", "resnet18", "--blocks", "3", "--input-size", "3", "32", "32",
                       "--num-classes", "10", "--model-kwargs", "drop_rate=0.25", "--checkpoint", str(weights),
                       "--save", str(save))
    assert rc == 0, err
    net = torch.load(save, weights_only=True)
    want = torch.load(weights, weights_only=True)
    assert torch.equal(net["model_state"]["conv1.weight"], want["conv1.weight"])  # the local weights, not random ones
    rc, _, err = run(capsys, "--model", "resnet18", "--blocks", "3", "--model-kwargs", "drop_rate")
    assert rc == 2 and "--model-kwargs 'drop_rate' is not KEY=VALUE" in err
    rc, _, err = run(capsys, "--model", "resnet18", "--blocks", "3", "--model-kwargs", "foo=1")
    assert rc == 2 and "resnet18 cannot be made with foo=1" in err and "\n" not in err.strip()
    rc, _, err = run(capsys, "--model", "resnet34", "--blocks", "3", "--checkpoint", str(weights))
    assert rc == 2 and "do not load into resnet34" in err and "\n" not in err.strip()
