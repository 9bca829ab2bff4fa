"""tools/gpu_suite.py's dry run: every section's code path on CPU at tiny sizes, so the GPU suite
cannot rot between runs on a GPU; and its refusals without CUDA. tools/gpu_session.sh
with a stub for the device's Python: what the one device call runs and what it brings back."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str = "gpu_suite"):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


@pytest.mark.slow  # a tool harness, about 45 s: in CI's slow tier, so the suite still cannot rot
def test_dry_run_exercises_every_section(tmp_path):
    """As a user runs it, in a process of its own (a training run and profiling leave state in a
    process that later allocator measurements in this one would see)."""
    suite = _tool()
    proc = subprocess.run([sys.executable, str(TOOLS / "gpu_suite.py"), "--dry-run", "--speed-batch", "3",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=TOOLS.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "gpu_suite.md").read_text()
    assert proc.stdout.strip() == md.strip()  # the Markdown is what it prints
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert res["dry_run"] and res["torch"] == torch.__version__ and "budget" not in " ".join(
        n for sec in res["sections"].values() for n in sec["notes"])
    sec = res["sections"]
    assert list(sec) == list(suite.SECTIONS) and all(_number(s["wall_s"]) and "error" not in s for s in sec.values())

    memory = sec["memory"]
    assert list(memory["batches"]) == [str(b) for b in suite.DRY.memory_batches]
    for rows in memory["batches"].values():
        assert list(rows) == list(suite.MEMORY_VARIANTS)
        assert all(_number(r["peak_bytes"]) and _number(r["ratio_to_bp"]) for r in rows.values())
        assert rows["bp"]["ratio_to_bp"] == 1.0

    for name in ("speed", "compiled"):
        rows = sec[name]["rows"]
        assert sec[name]["batch"] == 3  # --speed-batch, also in the compiled child
        assert list(rows) == list(suite.SPEED_VARIANTS) and rows["bp"]["ratio_to_bp"] == 1.0
        assert all(_number(r["median_step_s"]) and _number(r["ratio_to_bp"]) and r["timed_steps"] == suite.DRY.steps
                   for r in rows.values())
    compiled = sec["compiled"]
    assert compiled["backend"] == "aot_eager" and set(compiled["first_step_s"]) == set(suite.SPEED_VARIANTS)
    assert all(_number(r["compiled_over_eager"]) for r in compiled["rows"].values())
    blocks = suite.DRY.blocks  # every block, aux net and head compiled (bp: one block), none run eagerly
    assert [compiled["rows"][v]["graphs"] for v in suite.SPEED_VARIANTS] == [2, blocks + 1, 2 * blocks]

    accuracy = sec["accuracy"]
    assert set(accuracy["rules"]) == {"bp", "auglocal"} and "auglocal_minus_bp_points" in accuracy
    assert all(0 <= r["test_acc"] <= 1 and _number(r["train_time_s"]) for r in accuracy["rules"].values())

    for heading in ("dry run on CPU", "**Memory**", "**Step time**", "**Accuracy**", "| bp + checkpointing |",
                    "| auglocal, bf16 aux |"):
        assert heading in md
    assert "Notes:" not in md


@pytest.mark.slow  # 11 s: in the slow tier, to keep make test in budget
def test_an_oom_or_a_failed_section_costs_only_its_own_figures(tmp_path, monkeypatch, capsys):
    suite = _tool()
    monkeypatch.setattr(suite, "DRY", dataclasses.replace(suite.DRY, memory_batches=(2,)))
    peak = suite._peak_bytes

    def oom_for_bf16_aux(net, s, batch):
        if getattr(getattr(net, "plan", None), "config", None) is not None and net.plan.config.aux_dtype == "bfloat16":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return peak(net, s, batch)

    def broken(s, clock):
        raise RuntimeError("simulated failure\nsecond line")

    monkeypatch.setattr(suite, "_peak_bytes", oom_for_bf16_aux)
    monkeypatch.setattr(suite, "accuracy_section", broken)
    monkeypatch.setattr(suite, "speed_section", broken)  # no step-time header: the table is left out, not a crash
    assert suite.main(["--dry-run", "--out", str(tmp_path), "--sections", "memory", "speed", "accuracy"]) == 1
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = res["sections"]["memory"]["batches"]["2"]
    assert rows["auglocal, bf16 aux"]["peak_bytes"] == "OOM" and "ratio_to_bp" not in rows["auglocal, bf16 aux"]
    assert _number(rows["auglocal"]["peak_bytes"])
    assert res["sections"]["accuracy"]["error"] == "RuntimeError: simulated failure"
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| auglocal, bf16 aux | OOM | - |" in md and "accuracy: failed: RuntimeError: simulated failure" in md
    assert "speed: failed: RuntimeError: simulated failure" in md and "**Step time**" not in md
    assert "out of memory" in md


def test_budget_skips_what_does_not_fit(tmp_path, capsys):
    suite = _tool()
    # the reserve for writing leaves half a second, less than any item needs: everything is skipped
    assert suite.main(["--dry-run", "--out", str(tmp_path), "--budget-s", str(suite.RESERVE_S + 0.5),
                       "--sections", "memory", "speed"]) == 0
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    memory = res["sections"]["memory"]
    skipped = [r for rows in memory["batches"].values() for r in rows.values() if r.get("skipped")]
    assert len(skipped) == 2 * len(suite.MEMORY_VARIANTS) and all(r["peak_bytes"] is None for r in skipped)
    assert any("skipped" in n for n in memory["notes"]) and "skipped" in (tmp_path / "gpu_suite.md").read_text()
    assert res["sections"]["speed"]["notes"] and not res["sections"]["speed"]["rows"]
    # the compiled child gets what is left, 2 s here, and is killed when that runs out (its imports alone take longer)
    assert suite.main(["--dry-run", "--out", str(tmp_path), "--budget-s", str(suite.RESERVE_S + 2),
                       "--sections", "compiled"]) == 0
    compiled = json.loads((tmp_path / "gpu_suite.json").read_text())["sections"]["compiled"]
    assert compiled["rows"] == {} and "the budget ran out" in compiled["notes"][0]


def test_without_cuda_it_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    suite = _tool()
    assert suite.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_suite: error:") and "--dry-run" in err[0]
    assert not (tmp_path / "gpu_suite.json").exists()
    assert suite.main(["--dry-run", "--budget-s", "0", "--out", str(tmp_path)]) == 2
    assert "--budget-s" in capsys.readouterr().err
    assert suite.main(["--dry-run", "--speed-batch", "0", "--out", str(tmp_path)]) == 2
    assert "--speed-batch" in capsys.readouterr().err


# -- tools/gpu_session.sh: the one device call, run here with a stub for the device's Python -------
SESSION = TOOLS / "gpu_session.sh"


def _session(tmp_path, total: int, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run gpu_session.sh with PYTHON a stub that logs its arguments: what the call would run."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    stub.chmod(0o755)
    fmnist = tmp_path / "fmnist"
    fmnist.mkdir(exist_ok=True)
    (fmnist / "train-images-idx3-ubyte.gz").write_bytes(b"")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(stub), "PACK_EVERY": "1", "FMNIST": str(fmnist),
           "STUDY_DIR": str(tmp_path / "study"), **env}
    proc = subprocess.run(["bash", str(SESSION), str(tmp_path / "out"), str(total)], capture_output=True, text=True,
                          cwd=TOOLS.parent, env=env, timeout=60)
    return proc, log.read_text().splitlines() if log.is_file() else []


def test_session_study_alone_runs_the_runs_it_is_given(tmp_path):
    for run, finished in (("auglocal-seed1", False), ("dgl-seed1", True)):  # left by the study (a stub here)
        (tmp_path / "study" / run).mkdir(parents=True)
        (tmp_path / "study" / run / "last.pt").write_bytes(run.encode() * 1000)
        if finished:
            (tmp_path / "study" / run / "summary.json").write_text("{}")
    proc, calls = _session(tmp_path, 100, SUITE="0", RULES="auglocal dgl", SEEDS="1", EPOCHS="15", JOBS="3")
    assert proc.returncode == 0, proc.stderr
    study = [c for c in calls if c.startswith("tools/bench_accuracy.py")]
    assert len(study) == 2 and study[1].endswith("--status")  # the study, then where it stands
    for part in ("--rules auglocal dgl --seeds 1", "--set epochs=15", "--set channels_last=true", "--jobs 3",
                 f"--set data.root={tmp_path / 'fmnist'}"):
        assert part in study[0]
    assert not any("gpu_suite.py" in c for c in calls) and "GPU suite left out" in proc.stdout
    assert (tmp_path / "out" / "accuracy.tgz").is_file()
    # the unfinished run's checkpoint comes back, in parts, to be resumed elsewhere; the finished one's does not
    parts = sorted((tmp_path / "out").glob("checkpoints.tar.part-*"))
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        assert tar.getnames() == ["auglocal-seed1/last.pt"]
        assert tar.extractfile("auglocal-seed1/last.pt").read() == b"auglocal-seed1" * 1000


def test_session_default_runs_the_suite_beside_the_study(tmp_path):
    proc, calls = _session(tmp_path, 100)
    assert proc.returncode == 0, proc.stderr
    assert not list((tmp_path / "out").glob("checkpoints.tar.part-*"))  # the suite's files take the room
    suite = [c for c in calls if c.startswith("tools/gpu_suite.py")]
    assert [c.split("--budget-s")[0].strip() for c in suite] == [
        "tools/gpu_suite.py --sections memory", "tools/gpu_suite.py --sections speed compiled"]
    study = next(c for c in calls if c.startswith("tools/bench_accuracy.py"))  # started beside the memory section
    assert "--rules auglocal bp infopro dgl --seeds 0 1" in study and "--set epochs=10" in study


def test_session_without_fashion_mnist_refuses_in_one_line(tmp_path):
    proc, calls = _session(tmp_path, 100, FMNIST=str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Fashion-MNIST" in proc.stderr
    assert calls == []
