"""Crash safety: auglocal-train killed with SIGKILL mid-epoch loses at most that epoch, and resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from auglocal_fx.training.state import read_training

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def _recipe(tmp_path: Path, out: str) -> Path:
    recipe = {"model": {"name": "resnet20_cifar"},
              "data": {"dataset": "synthetic", "image_size": 32, "train_limit": 384, "test_limit": 64,
                       "num_workers": 0},
              # a progress line every 2 of the epoch's 12 steps: the kill lands mid-epoch
              "conversion": {"blocks": 4}, "epochs": 3, "batch_size": 32, "seed": 5, "device": "cpu",
              "log_interval": 2,
              "output": str(tmp_path / out)}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cmd(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "auglocal_fx.cli.train", str(recipe), *extra]


def _steps(out: Path) -> list[list[float]]:
    return [json.loads(line)["step_losses"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 37 s of a real run killed and resumed: in the slow tier, to keep make test in budget
def test_sigkill_mid_epoch_then_resume(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    recipe = _recipe(tmp_path, "killed")
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(recipe), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        for line in proc.stderr:  # progress lines; kill once epoch 2 is under way
            if line.startswith("epoch 2/3 ") or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"

    saved = read_training(out / "last.pt")  # intact and loadable: written atomically
    assert saved["train"]["epoch"] == 1  # only the epoch in progress is lost
    assert len(_steps(out)) == 1

    resumed = subprocess.run(_cmd(recipe, "--resume", "auto"), capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from epoch 1" in resumed.stdout

    clean = _recipe(tmp_path, "clean")
    done = subprocess.run(_cmd(clean), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _steps(out) == _steps(tmp_path / "clean")  # the same losses as a run never killed


def test_corrupt_checkpoint_is_reported_not_loaded(tmp_path, capsys):
    from auglocal_fx.cli.train import main as train_main

    recipe = _recipe(tmp_path, "c")
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04" + os.urandom(64))  # a truncated zip, as a torn write would leave
    assert train_main([str(recipe), "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unreadable or corrupt" in err and "\n" not in err.strip()
