"""Pipeline stages (parallel.pipeline): the stage split, and the proof that streaming the blocks over
P processes computes the sequential trainer's run (CPU, gloo, torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import history, tiny_recipe, write_recipe

from auglocal_fx import AugLocalError, build_plan
from auglocal_fx.cifar_resnet import CifarResNet
from auglocal_fx.cli.train import main as train_main
from auglocal_fx.costs import unit_costs
from auglocal_fx.runtime.checkpoint import read_checkpoint
from auglocal_fx.stages import assign_stages
from auglocal_fx.training import load_recipe, train

# GroupNorm: no batch statistics, so nothing but floating-point order may differ
GN = {"model.kwargs": {"norm_layer": "groupnorm1"}, "conversion.blocks": 5}


def _torchrun(procs: int, recipe: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "auglocal_fx.cli.train", str(recipe), *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)


def _weights(run: Path) -> dict:
    """Every weight of the run's last.pt (a pipeline's: gathered from the stages' shards)."""
    saved = read_checkpoint(run / "last.pt")
    return {**{f"model.{k}": v for k, v in saved["model_state"].items()},
            **{f"aux.{k}": v for k, v in saved["aux_state"].items()}}


def _assert_same_run(a: Path, b: Path) -> None:
    """Every step's loss, every block's epoch loss and every weight and buffer agree to 1e-5."""
    ha, hb = history(a), history(b)
    assert len(ha) == len(hb)
    for ea, eb in zip(ha, hb):
        torch.testing.assert_close(torch.tensor(eb["step_losses"]), torch.tensor(ea["step_losses"]), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(eb["local_losses"]), torch.tensor(ea["local_losses"]), rtol=0, atol=1e-5)
        assert eb["val_acc"] == ea["val_acc"] and eb["aux_val_acc"] == ea["aux_val_acc"]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), rtol=0, atol=1e-5, msg=k)


# -- the stage split --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plan():
    return build_plan(CifarResNet(20, num_classes=10), 10, input_size=(3, 32, 32))


def test_stages_balance_training_flops_and_count_what_crosses(plan):
    costs = unit_costs(plan)
    assert len(costs) == 10 and costs[-1] == 3 * (plan.block_sum(plan.blocks[-1], "flops") + plan.head.flops)
    for p in (2, 3, 4):
        sp = assign_stages(plan, p)
        assert [u for us in sp.units for u in us] == list(range(10)) and sp.stages == p
        by_count = assign_stages(plan, p, "units")
        assert max(sp.costs) <= max(by_count.costs)  # the exact min-max split is never worse
        assert [len(us) for us in by_count.units] in ([4, 3, 3], [5, 5], [3, 3, 2, 2])
        for s, us in enumerate(sp.units[:-1]):  # the boundary tensor (float32) and an int64 label per sample
            layer = plan.layers[plan.blocks[us[-1]].layers[-1]]
            assert sp.sent[s] == 4 * sum(torch.Size(t).numel() for t in layer.bundle) + 8
        assert sp.sent[-1] == 0 and sp.imbalance >= 1.0
    # memory per stage: the units' weights and optimizer state split between the stages, each
    # stage's peak adding its own largest unit and its transport buffers
    from auglocal_fx.costs import estimate_footprint
    from auglocal_fx.stages import stage_memory

    f = estimate_footprint(plan, 8)
    for p in (1, 2, 4):
        sp = assign_stages(plan, p)
        mem = stage_memory(plan, sp, 8)
        assert sum(m["resident_bytes"] for m in mem) == f.weights + f.optimizer
        for s, (m, us) in enumerate(zip(mem, sp.units)):
            busiest = max(f.units[u].gradients + 8 * f.units[u].act_per_sample for u in us)
            transport = 8 * (2 * sp.sent[s] + (sp.sent[s - 1] if s else 0))
            assert m["peak_bytes"] == m["resident_bytes"] + busiest + transport
        if p == 1:  # one stage: the step's estimate, which adds the largest gradients and activations apart
            assert f.weights + f.optimizer + f.gradients <= mem[0]["peak_bytes"] <= f.total
    with pytest.raises(AugLocalError, match=r"^stages = 11 is more pipeline stages than the 10 block\(s\) the plan "
                                            r"has; use at most 10, or convert into more blocks$"):
        assign_stages(plan, 11)


def test_memory_balance_gives_the_split_with_the_smallest_largest_process(plan):
    """balance="memory": of every contiguous split, the one whose largest estimated stage peak is
    smallest (checked against all of them); the early units' large maps give the first stage fewer."""
    import itertools

    from auglocal_fx.stages import StagePlan, stage_memory

    n = len(plan.blocks)
    for p in (2, 3):
        sp = assign_stages(plan, p, "memory")
        assert [u for us in sp.units for u in us] == list(range(n))
        got = max(m["peak_bytes"] for m in stage_memory(plan, sp))
        every = []
        for cuts in itertools.combinations(range(1, n), p - 1):
            bounds = [0, *cuts, n]
            groups = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
            split = assign_stages(plan, p, "units", groups=groups)
            every.append(max(m["peak_bytes"] for m in stage_memory(plan, split)))
        assert got == min(every)
        assert isinstance(sp, StagePlan)


# -- exactness ----------------------------------------------------------------------------------------
def _sequential(tmp_path: Path, recipe: dict, name: str) -> None:
    """The reference run, in this process with one thread as each pipeline process has: the same
    floating-point order (two threads split a conv's reductions differently, about 1e-5 apart)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main([str(write_recipe(tmp_path, recipe, name))]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # 32 s on 2 cores: in the slow tier, to keep make test in budget
def test_pipeline_of_2_and_3_stages_is_the_sequential_run_and_resumes_exactly(tmp_path):
    """Stage k computes batch n with its parameters before their step-n update and sends that output
    on, so stage k+1 gets what the sequential loop hands it: same losses, same weights. P=3 runs
    infopro, whose loss reads the input (the image travels with the boundary)."""
    seq = tiny_recipe(tmp_path / "seq", **GN)
    _sequential(tmp_path, seq, "seq.yaml")
    p2 = tiny_recipe(tmp_path / "p2", **GN, **{"parallel.pipeline": 2})
    proc = _torchrun(2, write_recipe(tmp_path, p2, "p2.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1  # rank 0 reports
    _assert_same_run(Path(seq["output"]), Path(p2["output"]))
    last = history(Path(p2["output"]))[-1]
    assert len(last["stage_busy"]) == 2 and all(0 < b <= 1 for b in last["stage_busy"])
    assert [u for us in last["stage_blocks"] for u in us] == list(range(5))
    assert len(last["peak_rss_gib"]) == 2 and all(g > 0 for g in last["peak_rss_gib"])  # per process
    _sharded_checkpoint_exports(tmp_path, Path(p2["output"]))

    seq_info = tiny_recipe(tmp_path / "seq_info", "infopro", **GN)
    _sequential(tmp_path, seq_info, "seq_info.yaml")
    p3 = tiny_recipe(tmp_path / "p3", "infopro", **GN, **{"parallel.pipeline": 3})
    proc = _torchrun(3, write_recipe(tmp_path, p3, "p3.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(Path(seq_info["output"]), Path(p3["output"]))
    assert len(history(Path(p3["output"]))[-1]["stage_busy"]) == 3


def _sharded_checkpoint_exports(tmp_path: Path, run: Path) -> None:
    """Each stage wrote its own shard (torch.distributed.checkpoint); the files name the folder, only
    folders a file names are kept, and auglocal-export reads the shards directly (onnxruntime parity)."""
    import onnxruntime as ort

    from auglocal_fx import load_auglocal
    from auglocal_fx.cli.export import main as export_main

    kept = {read_checkpoint(run / name, weights=False)["shards"] for name in ("last.pt", "best.pt")}
    assert {f"shards/{d.name}" for d in (run / "shards").iterdir()} == kept
    assert read_checkpoint(run / "last.pt", weights=False)["model_state"] is None  # no weights in the file
    onnx = tmp_path / "p2.onnx"
    assert export_main([str(run / "best.pt"), "--out", str(onnx)]) == 0
    net = load_auglocal(run / "best.pt").eval()
    x = torch.randn(2, 3, 16, 16)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), net.model(x), rtol=1e-4, atol=1e-4)
    # a checkpoint whose shards are gone is one line, not a traceback
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "last.pt").write_bytes((run / "last.pt").read_bytes())
    with pytest.raises(AugLocalError, match="keeps its weights in .*, which is missing or incomplete; copy the run "
                                            "folder whole"):
        load_auglocal(broken / "last.pt")


@pytest.mark.slow  # four launches; the exactness of the stages themselves is in the default suite
def test_pipeline_resumes_exactly_and_refuses_another_layout(tmp_path):
    seq = tiny_recipe(tmp_path / "seq", **GN)
    _sequential(tmp_path, seq, "seq.yaml")
    p3 = tiny_recipe(tmp_path / "p3", **GN, **{"parallel.pipeline": 3})
    path = write_recipe(tmp_path, p3, "p3.yaml")
    assert _torchrun(3, path, "--stop-after", "1").returncode == 0
    assert len(history(Path(p3["output"]))) == 1
    proc = _torchrun(3, path, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(Path(seq["output"]), Path(p3["output"]))
    # another number of stages, or none, cannot continue it: one line each, what to launch instead
    proc = _torchrun(2, path, "--resume", "auto", "--set", "parallel.pipeline=2")
    assert proc.returncode != 0 and ("cannot resume: the checkpoint was trained as 3 stages x 1 replicas (3 processes), "
                                     "this launch is 2 x 1; launch 3 processes (auglocal-train --nproc 3) with --set "
                                     "parallel.pipeline=3") in proc.stderr  # torchrun exits 1 when a process exits 2
    with pytest.raises(AugLocalError, match="3-stage pipeline checkpoint"):
        train(load_recipe(path, ["parallel.pipeline=1"]), resume=str(Path(p3["output"]) / "last.pt"))


def test_pipeline_needs_its_processes(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, **{"parallel.pipeline": 2})
    assert train_main([str(write_recipe(tmp_path, recipe))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe key parallel.pipeline is 2 but 1 process(es) were started" in err[0]


@pytest.mark.slow  # six processes in all; the pipeline's exactness itself is in the default suite
def test_pipeline_of_data_parallel_stages_is_the_data_parallel_run(tmp_path):
    """2 stages x 2 replicas (4 processes, every stage's units in DDP over its replicas) trains
    what plain DDP over 2 processes does at the same global batch."""
    common = {**GN, "data.augment": False, "epochs": 1}
    ddp = tiny_recipe(tmp_path / "ddp", **common)
    proc = _torchrun(2, write_recipe(tmp_path, ddp, "ddp.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    grid = tiny_recipe(tmp_path / "grid", **common, **{"parallel.pipeline": 2})
    proc = _torchrun(4, write_recipe(tmp_path, grid, "grid.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(Path(ddp["output"]), Path(grid["output"]))
    assert torch.load(Path(grid["output"]) / "last.pt", weights_only=True)["train"]["pipeline"]["replicas"] == 2


# -- auglocal-convert --stages / --plot -----------------------------------------------------------------
def test_convert_prints_stages_and_draws_the_plan(capsys, tmp_path):
    from auglocal_fx.cli.convert import main as convert_main

    argv = ["--model", "resnet20_cifar", "--input-size", "3", "32", "32", "--blocks", "8", "--stages", "3"]
    assert convert_main([*argv, "--plot", str(tmp_path / "plan.png")]) == 0
    out = capsys.readouterr().out
    assert "3 pipeline stages" in out and "Slowest stage / mean" in out
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert convert_main([*argv, "--format", "json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    stages = doc["memory"]["pipeline"]["stages"]
    assert [s["blocks"] for s in stages][0][0] == 0 and sum(len(s["blocks"]) for s in stages) == 8
    assert abs(sum(s["share"] for s in stages) - 1) < 1e-9 and stages[-1]["sent_bytes"] == 0
    assert convert_main([*argv[:-1], "9"]) == 2  # more stages than blocks: refused before any work
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["auglocal-convert: error: --stages 9 is more pipeline stages than the 8 block(s) the plan has; "
                   "use at most 8, or convert into more blocks"]


def test_unit_timing_leaves_the_run_untouched():
    """parallel.balance=time times the units on copies: weights, statistics and the random stream stay."""
    from auglocal_fx import to_auglocal
    from auglocal_fx.training.stage_timing import unit_seconds

    torch.manual_seed(0)
    net = to_auglocal(CifarResNet(20, num_classes=10), 4, input_size=(3, 16, 16))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = unit_seconds(net.local_units(), [3, 16, 16], 10, 8, torch.device("cpu"), repeats=2)
    assert len(seconds) == 4 and all(s > 0 for s in seconds)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    sp = assign_stages(net.plan, 2, "time", costs=seconds)
    assert sp.costs == [sum(seconds[u] for u in us) for us in sp.units]
    with pytest.raises(AugLocalError, match="needs measured costs"):
        assign_stages(net.plan, 2, "time")


def _p2p_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from auglocal_fx.training.p2p import Sender, recv_tensors

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    messages = [[torch.arange(6.0).reshape(2, 3), 5, None, torch.tensor([1, 2])],
                [torch.ones(3, dtype=torch.bfloat16), torch.zeros(0, 4)]]
    if rank == 0:
        sender = Sender(1, torch.device("cpu"), depth=1)
        for m in messages:
            sender.send(m)
        sender.flush()
    else:
        got = [recv_tensors(0, torch.device("cpu")) for _ in messages]
        torch.save(got, out)
    dist.destroy_process_group()


def test_p2p_carries_tensors_sizes_and_none(tmp_path):
    """A boundary may hand on a size or None beside its tensors (a bundle slot): they ride in the header."""
    import torch.multiprocessing as mp

    mp.spawn(_p2p_worker, args=(str(tmp_path / "store"), str(tmp_path / "got.pt")), nprocs=2)
    first, second = torch.load(tmp_path / "got.pt", weights_only=True)
    assert torch.equal(first[0], torch.arange(6.0).reshape(2, 3)) and first[1:3] == [5, None]
    assert torch.equal(first[3], torch.tensor([1, 2]))
    assert second[0].dtype == torch.bfloat16 and second[1].shape == (0, 4)


def test_stages_that_share_a_parameter_are_refused():
    from auglocal_fx.training.strategies import check_disjoint as _check_disjoint

    shared = torch.nn.Linear(2, 2)
    units = [torch.nn.Sequential(shared), torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Sequential(shared)]
    _check_disjoint(units, [[0, 1, 2]])  # one stage: fine
    with pytest.raises(AugLocalError, match=r"^blocks 0 and 2 share a parameter, so they cannot train in different "
                                            r"pipeline stages"):
        _check_disjoint(units, [[0, 1], [2]])


@pytest.mark.slow  # two launches that rendezvous; the stages themselves are proven above
def test_two_node_launch_on_one_machine_trains_and_checkpoints(tmp_path):
    """torchrun --nnodes 2 twice (node ranks 0 and 1, c10d rendezvous on 127.0.0.1), a 2-stage
    pipeline across the two "nodes": the same run as the sequential one, and its sharded checkpoint
    resumes. Both launches share the output folder, as nodes share a file system."""
    import socket

    seq = tiny_recipe(tmp_path / "seq", **GN)
    _sequential(tmp_path, seq, "seq.yaml")
    two = tiny_recipe(tmp_path / "nodes", **GN, **{"parallel.pipeline": 2})
    path = write_recipe(tmp_path, two, "nodes.yaml")
    def launch(*args: str) -> None:
        with socket.socket() as sock:  # a free port for this launch's rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        logs = [tmp_path / f"node{node}-{len(list(tmp_path.glob('node*')))}.log" for node in (0, 1)]
        procs = []
        for node, log in enumerate(logs):  # to files: a full pipe would stall one node while the other waits
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                     "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                     "-m", "auglocal_fx.cli.train", str(path), *args],
                    env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT))
        for proc, log in zip(procs, logs):
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]

    launch("--stop-after", "1")
    assert len(history(Path(two["output"]))) == 1
    launch("--resume", "auto")
    _assert_same_run(Path(seq["output"]), Path(two["output"]))

