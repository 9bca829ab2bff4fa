"""Throughput of pipeline stages against the other ways to use P processors, in one run.

    python tools/bench_pipeline.py                          # P = 2, recipes/fashion_mnist_auglocal.yaml
    python tools/bench_pipeline.py --stages 2 --set batch_size=64 --steps 40 [--json]
    python tools/bench_pipeline.py --stages 2 4 --only "sequential x1" "pipeline 2" "pipeline 4"  # memory

Every row is an ordinary ``auglocal-train`` run of the same recipe (same model, blocks, batch and
data; ``epochs: 2``, ``--steps`` steps per epoch), in its own process(es):

- ``sequential x1``: local training, one process, one thread (the baseline the 1.5x target is about);
- ``sequential xP``: local training, one process, P threads;
- ``pipeline P``: ``parallel.pipeline: P`` under torchrun, P processes with one thread each;
- ``ddp P``: data parallel under torchrun, P processes with one thread each;
- ``bp xP``: backprop (rule ``bp``), one process, P threads.

Each row also gives every process's peak resident memory (the epoch records' ``peak_rss_gib``) and
the largest one's over the one-process run's: what a pipeline saves per machine or device. Beside
it, per stage, the plan's estimate (``stage_memory``: weights, optimizer state, the largest unit's
gradients and activations, transport buffers) plus the runtime, measured here as the peak resident
memory of a process that only imports the trainer (torch, torchvision, timm: it does not divide).

Images/s is the second epoch's (the first pays for warm-up: allocator, thread pools, a pipeline's
fill happens every epoch and is counted). For the pipeline, each stage's share of the epoch spent
computing (forward, local losses, backward, optimizer), blocked sending, and waiting for its input
(the bubble), and the sum of the stages' compute time over the sequential run's: above 1 the split
itself costs (per-process overheads, tensor copies); a stage below 1 - 1/P busy waits on a slower one.
On a CPU the P processes share caches and memory bandwidth, so these ratios say less than P GPUs would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auglocal_fx.cli.common import run_cli  # noqa: E402
from auglocal_fx.errors import AugLocalError  # noqa: E402

PROG = "bench_pipeline"
ROOT = Path(__file__).resolve().parents[1]


def _configs(ps: list[int]) -> list[tuple[str, int, int, list[str]]]:
    """(name, processes, threads per process, extra overrides), for every P in ``ps``."""
    rows = [("sequential x1", 1, 1, [])]
    for p in ps:
        rows += [(f"sequential x{p}", 1, p, []), (f"pipeline {p}", p, 1, [f"parallel.pipeline={p}"]),
                 (f"ddp {p}", p, 1, []), (f"bp x{p}", 1, p, ["conversion.rule=bp"])]
    return rows


def _pythonpath() -> str:
    """The repository first, then the caller's path (a recipe's own model or data module, a probe)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def _runtime_gib() -> float:
    """Peak resident memory of a process that imports the trainer and nothing more (GiB)."""
    code = ("import auglocal_fx.training.trainer; from auglocal_fx.runtime.memory import peak_rss_bytes; "
            "print(peak_rss_bytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": _pythonpath()})
    return int(out.stdout.split()[-1]) / 2**30


def _run(name: str, procs: int, threads: int, overrides: list[str], args, out: Path) -> dict:
    run_dir = out / name.replace(" ", "_")
    sets = [*args.overrides, *overrides, "epochs=2", f"output={run_dir}"]
    if args.steps:
        sets.append(f"data.train_limit={args.steps * args.global_batch}")
    sets.append(f"data.test_limit={args.test_limit}")
    train = ["-m", "auglocal_fx.cli.train", args.recipe, *(a for s in sets for a in ("--set", s)), "--overwrite"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *train]
           if procs > 1 else [sys.executable, *train])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": _pythonpath()}
    print(f"== {name}: {procs} process(es) x {threads} thread(s)", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise AugLocalError(f"the {name} run failed: {tail}")
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = history[-1]
    row = {"name": name, "processes": procs, "threads": threads, "images_per_s": last["images_per_s"],
           "epoch_time_s": last["epoch_time_s"], "steps": len(last["step_losses"]),
           # each process's peak resident memory over the run (a checkpoint included)
           "peak_rss_gib": last.get("peak_rss_gib")}
    for key in ("stage_busy", "stage_send", "stage_blocks", "stage_estimate_gib"):
        if key in last:
            row[key] = last[key]
    return row


def _global_batch(recipe: str, overrides: list[str]) -> int:
    from auglocal_fx.training import load_recipe

    return load_recipe(recipe, overrides).batch_size


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/fashion_mnist_auglocal.yaml")
    p.add_argument("--stages", type=int, nargs="+", default=[2],
                   help="P: stages, processes and threads to compare (default 2; several: 2 4)")
    p.add_argument("--steps", type=int, default=40, help="training steps per epoch (data.train_limit = steps x batch)")
    p.add_argument("--test-limit", type=int, default=500, help="test images evaluated per epoch (not timed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run, e.g. --set batch_size=64 (repeatable)")
    p.add_argument("--only", nargs="+", help="run only these rows (names as printed, e.g. 'pipeline 2')")
    p.add_argument("--out", help="folder for the runs (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if min(args.stages) < 2 or args.steps < 1:
        raise AugLocalError(f"--stages {' '.join(map(str, args.stages))} --steps {args.steps}: give at least 2 stages "
                            "and 1 step")
    args.global_batch = _global_batch(args.recipe, args.overrides)
    configs = [c for c in _configs(args.stages) if not args.only or c[0] in args.only]
    if args.only and len(configs) < len(set(args.only)):
        known = ", ".join(repr(c[0]) for c in _configs(args.stages))
        raise AugLocalError(f"--only {' '.join(map(repr, args.only))}: not every name is a row; the rows are {known}")
    runtime = _runtime_gib()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        rows = [_run(*c, args, out) for c in configs]
    base = next((r for r in rows if r["name"] == "sequential x1"), None)
    for r in rows:
        r["vs_sequential_x1"] = r["images_per_s"] / base["images_per_s"] if base else None
        # the largest process's peak RSS over the one process's (what must fit on one machine / device)
        r["rss_vs_sequential_x1"] = max(r["peak_rss_gib"]) / max(base["peak_rss_gib"]) \
            if base and r["peak_rss_gib"] and base["peak_rss_gib"] else None
    pipes = [r for r in rows if "stage_busy" in r]
    for pipe in pipes:
        if base is not None:  # stage compute seconds per step, summed, over the sequential run's seconds per step
            per_step = pipe["epoch_time_s"] / pipe["steps"]
            pipe["compute_over_sequential"] = sum(b * per_step for b in pipe["stage_busy"]) / (
                base["epoch_time_s"] / base["steps"])
        pipe["estimate_with_runtime_gib"] = [e + runtime for e in pipe.get("stage_estimate_gib", [])]
    res = {"recipe": args.recipe, "overrides": args.overrides, "stages": args.stages, "steps": args.steps,
           "batch": args.global_batch, "machine": platform.machine(), "cpus": os.cpu_count(),
           "runtime_gib": runtime, "rows": rows}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{args.recipe} {' '.join('--set ' + o for o in args.overrides)}, batch {args.global_batch}, "
          f"{args.steps} steps/epoch, epoch 2".strip())
    print(f"{'run':16s} {'procs x threads':>15s} {'images/s':>9s} {'vs sequential x1':>17s} "
          f"{'peak RSS per process (GiB)':>27s} {'largest vs x1':>13s}")
    for r in rows:
        ratio = f"{r['vs_sequential_x1']:.2f}x" if r["vs_sequential_x1"] else "-"
        rss = " ".join(f"{g:.2f}" for g in r["peak_rss_gib"] or [])
        mem = f"{r['rss_vs_sequential_x1']:.2f}x" if r["rss_vs_sequential_x1"] else "-"
        print(f"{r['name']:16s} {r['processes']:>9d} x {r['threads']:<3d} {r['images_per_s']:9.1f} {ratio:>17s} "
              f"{rss:>27s} {mem:>13s}")
    print(f"runtime (a process that imports the trainer): {runtime:.2f} GiB peak RSS, in every process")
    for pipe in pipes:
        print(f"{pipe['name']}:")
        for s, (busy, send, blocks, rss, est) in enumerate(zip(pipe["stage_busy"], pipe["stage_send"],
                                                               pipe["stage_blocks"], pipe["peak_rss_gib"],
                                                               pipe["estimate_with_runtime_gib"])):
            print(f"  stage {s} (blocks {blocks[0]}-{blocks[-1]}): computing {100 * busy:.0f}%, blocked sending "
                  f"{100 * send:.0f}%, waiting for input {100 * max(0.0, 1 - busy - send):.0f}% of the epoch; "
                  f"peak RSS {rss:.2f} GiB, plan's estimate + runtime {est:.2f} GiB")
        if "compute_over_sequential" in pipe:
            print(f"  stages' compute time summed / sequential x1's: {pipe['compute_over_sequential']:.2f}")
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
