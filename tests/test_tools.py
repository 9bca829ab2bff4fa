"""The benchmark tools run end to end on tiny settings and print their figures as JSON.

The figures themselves are measured with the commands in BENCHMARKS.md; here only their shape and
the invariants that hold at any size (bp's ratio is 1, auglocal's activations are below bp's, the
planner's estimate is reported, a finished accuracy study resumes without retraining).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # what pickle finds: --jobs children run functions of the module by name
    spec.loader.exec_module(module)
    return module


def _json_run(capsys, name: str, argv: list[str]) -> dict:
    assert _tool(name).main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_memory(capsys):
    res = _json_run(capsys, "bench_memory", ["--part", "activations", "--model", "resnet20_cifar", "--blocks", "4",
                                             "--batch", "4", "--size", "32"])
    (setting,) = res["settings"]
    rules = setting["rules"]
    assert set(rules) == {"bp", "dgl", "auglocal", "auglocal/memory"}
    assert rules["bp"]["activations_ratio"] == 1.0
    for label in ("auglocal", "auglocal/memory"):
        r = rules[label]
        assert r["blocks"] == 4 and r["activations"] < rules["bp"]["activations"]
        assert r["with_weights"] >= r["activations"] and r["estimate"] > 0
    assert "estimate" not in rules["dgl"]


@pytest.mark.slow  # a tool harness: a fresh training process per row, about 40 s
def test_bench_memory_total(capsys):
    rows = ["bp", "bp + checkpointing at the K blocks", "dgl", "auglocal", "auglocal, one step at the end",
            "auglocal, recompute=block"]
    timm_ck = "bp + timm set_grad_checkpointing"  # the CIFAR ResNet has none: its row is left out
    res = _json_run(capsys, "bench_memory", ["--part", "total", "--model", "resnet20_cifar", "--blocks", "4",
                                             "--batch", "4", "--size", "32", "--threads", "1", "--rows", *rows, timm_ck])
    (setting,) = res["total"]
    got = setting["rows"]
    assert list(got) == rows and setting["crossover"] is not None
    ck, bp = got["bp + checkpointing at the K blocks"]["estimate"], got["bp"]["estimate"]
    assert ck["activations"] < bp["activations"] and ck["weights"] == bp["weights"]
    for r in got.values():
        assert r["rss"] >= r["base"] > 0 and r["allocated"] > 0 and r["estimate"]["total"] > 0
    assert got["bp"]["allocated_ratio"] == got["bp"]["estimate_ratio"] == 1.0
    per_unit, at_end = got["auglocal"]["estimate"], got["auglocal, one step at the end"]["estimate"]
    assert per_unit["gradients"] < at_end["gradients"] and per_unit["weights"] == at_end["weights"]
    assert got["auglocal"]["allocated"] <= got["auglocal, one step at the end"]["allocated"]


def test_bench_speed(capsys):
    res = _json_run(capsys, "bench_speed", ["--model", "resnet20_cifar", "--blocks", "4", "--batch", "4",
                                            "--size", "32", "--steps", "1", "--warmup", "0", "--profile",
                                            "--memory-options"])
    rules = res["rules"]
    assert all(rules[f"auglocal+{o}"]["ratio_to_auglocal"] > 0 for o in ("recompute=block", "bf16 aux"))
    assert rules["bp+checkpointing"]["ratio_to_bp"] > 0 and 1.0 < rules["bp+checkpointing"]["flops_ratio"] < 1.34
    assert "bp+timm checkpointing" not in rules  # the CIFAR ResNet has no set_grad_checkpointing
    assert rules["bp"]["ratio_to_bp"] == 1.0 and rules["bp"]["flops_ratio"] == 1.0
    assert rules["auglocal"]["flops_ratio"] > 1.0 and rules["auglocal"]["blocks"] == 4
    phases = rules["auglocal"]["phases_s"]
    assert set(phases) == {"block forward", "aux/head forward", "backward", "optimizer"}
    assert all(v > 0 for v in phases.values())


def test_bench_convert(capsys):
    res = _json_run(capsys, "bench_convert", ["--models", "resnet20_cifar", "--blocks", "4", "--repeats", "1"])
    (row,) = res["models"]
    assert row["blocks"] == 4 and row["layers"] == 10
    assert row["ratio"] > 0 and row["plan_ratio"] > 0 and row["aux_params"] > 0


def test_bench_accuracy_runs_resumes_and_rejects_overrides(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    argv = ["--set", "epochs=1", "--set", "data.dataset=synthetic", "--set", "data.train_limit=64",
            "--set", "data.test_limit=32", "--set", "batch_size=32", "--set", "conversion.blocks=4",
            "--seeds", "0", "1", "--out", str(tmp_path)]
    res = _json_run(capsys, "bench_accuracy", argv)
    assert sorted((r["rule"], r["seed"]) for r in res["runs"]) == sorted(
        (rule, seed) for rule in ("bp", "dgl", "auglocal") for seed in (0, 1))
    summary = res["summary"]
    assert summary["rules"]["bp"]["time_ratio_to_bp"] == 1.0
    assert set(summary["gaps_points"]) == {"auglocal_minus_bp", "auglocal_minus_dgl"}
    for rule, row in summary["rules"].items():  # the epoch tested (1 of 1) and the train accuracy beside it
        mine = [r for r in res["runs"] if r["rule"] == rule]
        assert row["best_epochs"] == [1, 1]
        assert row["selected_held_out_acc"] == pytest.approx(sum(r["held_out_acc_per_epoch"][0] for r in mine) / 2)
        assert row["train_acc_last"] == pytest.approx(sum(r["train_acc_per_epoch"][-1] for r in mine) / 2)
    with pytest.raises(SystemExit, match="2"):  # argparse: --rules takes the registered rules
        _tool("bench_accuracy").main([*argv, "--rules", "nope"])
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    mtime = (tmp_path / "auglocal-seed1" / "last.pt").stat().st_mtime_ns
    assert _json_run(capsys, "bench_accuracy", argv)["runs"] == res["runs"]  # nothing retrained
    assert (tmp_path / "auglocal-seed1" / "last.pt").stat().st_mtime_ns == mtime
    assert _tool("bench_accuracy").main([*argv[:-2], "--out", str(tmp_path), "--set", "seed=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seeds" in err[0]
    assert _tool("bench_accuracy").main([*argv, "--seeds", "0", "1", "2", "--status"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [f"{rule}-seed{k}" for k in (0, 1, 2) for rule in ("bp", "dgl", "auglocal")]
    assert all(r.split()[1] == "1/1" and r.endswith("finished") for r in rows[:6])
    assert all(r.split()[1] == "0/1" and r.endswith("queued") for r in rows[6:])
    assert _tool("bench_accuracy").main(argv) == 0  # the table: test, held-out and train accuracy per rule
    table = capsys.readouterr().out
    assert "held-out" in table and "train" in table and "auglocal minus bp" in table


@pytest.mark.parametrize("bad", [["--set", "optimizer.lr=0.5"]])
def test_bench_accuracy_refuses_another_study_in_the_same_folder(capsys, tmp_path, bad):
    (tmp_path / "results.json").write_text(json.dumps({"recipe": "recipes/fashion_mnist_auglocal.yaml",
                                                       "overrides": [], "runs": []}))
    assert _tool("bench_accuracy").main([*bad, "--out", str(tmp_path)]) == 2
    assert "another recipe" in capsys.readouterr().err


def test_granularity(capsys):
    rows = _json_run(capsys, "granularity", ["resnet20_cifar"])
    assert rows == [{"model": "resnet20_cifar", "layers": 10, "repeated_blocks": 9, "widest_cut": 1, "why": ""}]
    assert _tool("granularity").main(["no_such_model"]) == 2




def test_bench_accuracy_jobs_run_in_children_with_their_own_logs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    argv = ["--set", "epochs=1", "--set", "data.dataset=synthetic", "--set", "data.train_limit=64",
            "--set", "data.test_limit=32", "--set", "batch_size=32", "--set", "conversion.blocks=4",
            "--rules", "bp", "auglocal", "--seeds", "0", "--out", str(tmp_path), "--jobs", "2", "--threads", "1"]
    res = _json_run(capsys, "bench_accuracy", argv)
    assert sorted(r["rule"] for r in res["runs"]) == ["auglocal", "bp"] and res["threads"] == 1
    for r in res["runs"]:
        assert r["selected_on"] == r["held_out"] == "val" and len(r["held_out_acc_per_epoch"]) == 1
        assert 0 <= r["test_acc"] <= 1 and r["best_epoch"] == 1
        assert "epoch 1/1" in (tmp_path / f"{r['rule']}-seed0" / "train.log").read_text()
    assert (tmp_path / "curves.png").stat().st_size > 0


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid``, from /proc."""
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # starts two training children and waits for them
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_bench_accuracy_children_end_with_the_study(tmp_path):
    """Killing the study (a closed session, Ctrl-C's SIGKILL cousin) ends its --jobs children too:
    an orphan would go on training into the folder of the study started again."""
    argv = [sys.executable, "tools/bench_accuracy.py", "--set", "epochs=100", "--set", "data.dataset=synthetic",
            "--set", "data.train_limit=64", "--set", "data.test_limit=32", "--set", "batch_size=32",
            "--set", "conversion.blocks=4", "--rules", "bp", "auglocal", "--seeds", "0", "--jobs", "2",
            "--threads", "1", "--out", str(tmp_path)]
    study = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"{rule}-seed0" / "metrics.jsonl").is_file() for rule in ("bp", "auglocal")):
            assert study.poll() is None and time.monotonic() < deadline, "the study ended before both runs trained"
            time.sleep(0.5)
        children = _children(study.pid)
        assert len(children) >= 2
        os.kill(study.pid, signal.SIGKILL)
        study.wait()
        deadline = time.monotonic() + 20
        while alive := {c for c in children if _running(c)}:
            assert time.monotonic() < deadline, f"children {sorted(alive)} still run after the study was killed"
            time.sleep(0.5)
    finally:
        if study.poll() is None:
            study.kill()


@pytest.mark.slow  # three torchrun launches; the pipeline itself is proven in test_pipeline.py
def test_bench_pipeline_reports_every_way_to_use_two_processors(capsys, tmp_path):
    res = _json_run(capsys, "bench_pipeline", ["--set", "data.dataset=synthetic", "--set", "batch_size=32",
                                               "--set", "conversion.blocks=4", "--steps", "2", "--test-limit", "32",
                                               "--stages", "2", "4", "--only", "sequential x1", "pipeline 2",
                                               "pipeline 4", "--out", str(tmp_path)])
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"sequential x1", "pipeline 2", "pipeline 4"} and rows["sequential x1"]["vs_sequential_x1"] == 1.0
    assert 0.3 < res["runtime_gib"] < max(rows["sequential x1"]["peak_rss_gib"])
    for p in (2, 4):
        pipe = rows[f"pipeline {p}"]
        assert pipe["processes"] == p and len(pipe["stage_busy"]) == p and pipe["images_per_s"] > 0
        assert pipe["compute_over_sequential"] > 0 and len(pipe["peak_rss_gib"]) == p
        assert all(e > res["runtime_gib"] for e in pipe["estimate_with_runtime_gib"])


def test_pipeline_model_compares_the_three_schemes(capsys):
    res = _json_run(capsys, "pipeline_model", ["--models", "resnet20_cifar:8", "--stages", "2", "4", "--rules", "dgl"])
    (model,) = res["models"]
    assert [r["stages"] for r in model["rows"]] == [2, 4]
    for r in model["rows"]:
        assert 0 < r["local_pipeline_speedup"] <= r["stages"] and r["ddp_speedup"] <= r["stages"] + 1e-9
        assert r["onef1b_speedup"] <= r["stages"] and r["local_send_mb"] > 0


@pytest.mark.slow  # a training run in a process of its own (the probe is imported at interpreter start-up)
def test_rss_phases_says_in_which_phase_each_peak_was_reached(tmp_path):
    from test_training import tiny_recipe, write_recipe

    # host memory released as freed: kept (the default), RSS shows what was ever held, not each phase's need
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, host_memory="release"))
    probe, folder = TOOLS / "rss_phases", tmp_path / "rss"
    env = {**os.environ, "AUGLOCAL_RSS_PHASES": str(folder), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(probe), str(TOOLS.parent)])}
    run = subprocess.run([sys.executable, "-m", "auglocal_fx.cli.train", str(recipe)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (tsv,) = folder.glob("rss-main-*.tsv")
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    phases = {r[1] for r in rows}
    assert {"Trainer._start", "Trainer.train_epoch", "Trainer.evaluate", "Trainer._save"} <= phases
    assert {r[2] for r in rows if r[1] == "Trainer.train_epoch"} >= {"auglocal.forward", "auglocal.backward"}
    assert all(float(r[3]) > 0.3 for r in rows)  # GiB: torch alone is more
    shown = subprocess.run([sys.executable, str(probe / "sitecustomize.py"), str(folder)], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and "Trainer.train_epoch  (at auglocal." in shown.stdout, shown.stdout
    bad = subprocess.run([sys.executable, str(probe / "sitecustomize.py"), str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# -- the authors' implementation as a peer row (--reference-dir), with a stand-in checkout -----------
# Their code is not in this repository, not even here: a checkout of a few lines with their interface
# (resnet32(**kw) -> a model whose forward in train mode runs its own backward) stands in for it.
STAND_IN = '''
import torch
import torch.nn.functional as F
from torch import nn

BUILT, WEIGHTS = [], []  # what the tools passed, for the tests to read


class StandIn(nn.Module):
    def __init__(self, local_module_num, class_num=10, **kw):
        super().__init__()
        self.local_module_num = local_module_num
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.aux_classifier_0_0 = nn.Linear(4, class_num)
        self.fc = nn.Linear(4, class_num)

    def forward(self, img, target=None, **weights):
        WEIGHTS.append(weights)
        h = F.relu(self.stem(img)).mean((2, 3))
        local = weights.get("ixy_1", 0) * F.cross_entropy(self.aux_classifier_0_0(h), target)
        if self.training:
            local.backward()
        logits = self.fc(h.detach())
        loss = F.cross_entropy(logits, target)
        if self.training:
            loss.backward()
        return logits, loss, [], [], []


def resnet32(**kw):
    BUILT.append(kw)
    return StandIn(**kw)
'''


def _stand_in(root: Path, resnet: str = STAND_IN) -> Path:
    (root / "networks").mkdir(parents=True)
    (root / "networks" / "__init__.py").write_text("")
    (root / "networks" / "resnet.py").write_text(resnet)
    return root


@pytest.fixture
def torch_threads():
    """The test's --threads 1 (two threads beside another busy process run 3-4x slower) undone after."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_speed_reference_row(capsys, tmp_path, torch_threads):
    ref = _stand_in(tmp_path / "AugLocal")
    res = _json_run(capsys, "bench_speed", ["--model", "resnet32_cifar", "--blocks", "16", "--aux-depth", "3",
                                            "--batch", "4", "--size", "32", "--steps", "2", "--warmup", "0",
                                            "--threads", "1", "--reference-dir", str(ref)])
    rules = res["rules"]
    assert set(rules) == {"bp", "dgl", "auglocal", "reference", "auglocal+unit optimizers"}
    assert res["tail"] == "reference" and rules["auglocal+unit optimizers"]["blocks"] == 13
    row = rules["reference"]
    assert row["ratio_to_bp"] > 0 and row["ratio_to_auglocal"] > 0 and row["flops_ratio"] > 1.0
    assert row["params"] == 3 * 4 * 9 + 4 + 2 * (4 * 10 + 10) and row["aux_params"] == 4 * 10 + 10
    assert row["blocks"] == rules["auglocal"]["blocks"] == 13  # their split, M = K - d, on both sides
    built = sys.modules["networks.resnet"]
    assert built.BUILT[-1] | {"batch_size": 4} == {
        "local_module_num": 13, "batch_size": 4, "image_size": 32, "dataset": "cifar10", "class_num": 10,
        "rule": "AugLocal", "aux_net_config": "unifSamp", "aux_net_depth": 3, "is_pyramid": True,
        "paramid_coeff": 0.5}
    assert built.WEIGHTS[-1] == {"ixx_1": 0.0, "ixy_1": 1.0, "ixx_2": 0.0, "ixy_2": 1.0}  # train.py's


@pytest.mark.slow  # three rows, each a fresh training process: about 25 s
def test_bench_memory_total_reference_rows(capsys, tmp_path):
    ref = _stand_in(tmp_path / "AugLocal")
    res = _json_run(capsys, "bench_memory", ["--part", "total", "--model", "resnet32_cifar", "--blocks", "16",
                                             "--aux-depth", "3", "--batch", "4", "--size", "32", "--threads", "1",
                                             "--rows", "reference (authors' LocalResNet)", "--reference-dir", str(ref)])
    (setting,) = res["total"]
    got = setting["rows"]
    assert list(got) == ["reference (authors' LocalResNet)", "auglocal, tail=reference, one step at the end",
                         "auglocal, tail=reference"]
    assert got["auglocal, tail=reference"]["estimate"]["gradients"] < \
        got["auglocal, tail=reference, one step at the end"]["estimate"]["gradients"]  # one unit's, as the trainer
    theirs, ours = got["reference (authors' LocalResNet)"], got["auglocal, tail=reference, one step at the end"]
    assert theirs["estimate"] is None and ours["estimate"]["total"] > 0  # theirs has no plan
    for r in (theirs, ours):
        assert r["rss"] >= r["base"] > 0 and r["allocated"] > 0
    assert theirs["allocated"] < ours["allocated"]  # a few hundred weights against ResNet-32's


def test_reference_dir_refused_in_one_line(capsys, tmp_path):
    speed = ["--model", "resnet32_cifar", "--blocks", "16", "--size", "32", "--steps", "1", "--warmup", "0"]
    memory = ["--part", "total", "--model", "resnet32_cifar", "--blocks", "16", "--size", "32", "--rows", "bp"]
    for name, argv in (("bench_speed", speed), ("bench_memory", memory)):
        assert _tool(name).main([*argv, "--reference-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--reference-dir {tmp_path}: no networks/resnet.py" in err[0], err
    ref = _stand_in(tmp_path / "AugLocal")
    assert _tool("bench_speed").main(["--model", "resnet20_cifar", "--reference-dir", str(ref)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet32_cifar and resnet110_cifar only" in err[0], err
    assert _tool("bench_memory").main([*memory[:-2], "--rows", "reference (authors' LocalResNet)"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --reference-dir" in err[0], err
    broken = _stand_in(tmp_path / "broken", "import no_such_package_here\n")
    with pytest.raises(_tool("reference_peer").AugLocalError, match=r"broken: importing networks/resnet.py failed: .*no_such_package_here"):
        _tool("reference_peer").load_reference(broken)


@pytest.mark.slow  # a tool harness, about 20 s: the runtime's stand-in tests are in the default tier
def test_bench_gpu_dry_run_steps_every_variant(capsys, tmp_path, torch_threads):
    """Every variant of the GPU table (graphs, overlap and offload through their CPU stand-ins) steps,
    and the table is written; the figures of a dry run mean nothing."""
    tool = _tool("bench_gpu")

    def fails(c):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")
    tool.VARIANTS = {"a variant that fails": fails, **tool.VARIANTS}  # a fresh module per _tool call
    assert tool.main(["--dry-run", "--out", str(tmp_path), "--warmup", "3", "--steps", "1"]) == 0
    res = json.loads((tmp_path / "bench_gpu.json").read_text())
    (setting,) = res["settings"]
    rows = setting["rows"]
    assert list(rows) == [v for v in tool.VARIANTS if v != "reference"]
    failed = rows.pop("a variant that fails")  # its row says why; the variants after it still ran
    assert failed["median_step_s"] == "failed" and failed["error"].startswith("RuntimeError: operation not permitted")
    assert all(row["median_step_s"] > 0 and row["timed_steps"] == 1 for row in rows.values())
    table = (tmp_path / "bench_gpu.md").read_text()
    assert "| auglocal + graphs |" in table and "dry run" in table and "a variant that fails: RuntimeError" in table


@pytest.mark.parametrize("argv, says", [
    (["--device", "cuda"], "--device cuda: no CUDA device here"),
    (["--dry-run", "--warmup", "2"], "--warmup 2: the graphs variant captures at its third step"),
])
def test_bench_gpu_refuses_in_one_line(capsys, tmp_path, argv, says):
    assert _tool("bench_gpu").main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err, err
