"""The GPU suite: memory, step time and a short accuracy run of bp against AugLocal on one CUDA
device, in at most 8 minutes, written as JSON and a Markdown table for BENCHMARKS.md.

    python tools/gpu_suite.py                                  # on a GPU: runs/gpu_suite/gpu_suite.{json,md}
    python tools/gpu_suite.py --out runs/gpu --budget-s 480
    python tools/gpu_suite.py --sections compiled --budget-s 400   # rerun one part, e.g. one the budget cut
    python tools/gpu_suite.py --dry-run --out /tmp/gs          # on CPU at tiny sizes: every code path

What it measures (the full run; ``--dry-run`` swaps in the tiny sizes of ``DRY``):

- ``memory``: ``torch.cuda.max_memory_allocated`` (the peak statistics reset before each variant,
  the previous one freed: ``del`` + ``torch.cuda.empty_cache()``) over moving the converted net onto
  the device and two training steps with SGD + momentum, for bp, bp with activation checkpointing
  at the same K block boundaries (``checkpointed.py``), auglocal on the paper's split, auglocal with
  ``balance=memory`` and auglocal with bfloat16 aux nets; resnet50 K=16 at 224 px (1000 classes),
  batch 64 and 256, fp32, with each one's ratio to bp. A variant that runs out of memory is
  recorded as ``OOM`` and the suite goes on.
- ``speed``: median step time of bp, bp + checkpointing and auglocal, steps interleaved (bp, ck,
  auglocal, bp, ...), as ratios to bp, under bf16 autocast with channels_last weights and inputs
  (``cudnn.benchmark`` on); resnet50 K=16, batch 64. ``speed`` runs them eagerly; ``compiled``
  after ``net.compile()`` (every block, aux net and head; for the checkpointed model its blocks and
  head, so the checkpoints stay outside the compiled code), in a child process that is killed when
  the budget runs out, what it finished kept. The first compiled step (compilation) is reported apart.
- ``accuracy``: ``recipes/fashion_mnist_auglocal.yaml`` (CIFAR ResNet-20, K=8) trained for two
  epochs with ``conversion.rule`` bp and then auglocal, on Fashion-MNIST when it is installed
  (``apt-get install dataset-fashion-mnist``), else on the synthetic set; the test accuracy of each.

Every section and every item in it first checks the time left of ``--budget-s`` (default 480 s):
what would not fit is skipped with a note in the output instead of overrunning. The run writes
``OUT/gpu_suite.json`` and ``OUT/gpu_suite.md`` (atomically) and prints the Markdown, headed with
the card's name (``torch.cuda.get_device_name``), torch and CUDA versions and each section's wall
seconds: run it on a GPU and put that Markdown into BENCHMARKS.md with the card's name.

``--dry-run`` runs the same code on CPU at tiny sizes (CIFAR ResNet-20 at 32 px, K=4, batch 2-4,
``torch.compile`` backend ``eager``, a few synthetic training steps; the CPU profiler's allocator
peak stands in for ``max_memory_allocated``), in well under a minute: ``tests/test_gpu_suite.py``
runs it in the slow tier (CI runs it), so the suite cannot rot between GPU sessions. Its figures mean nothing.
Exit status: 0, 1 when a section failed (its error is in the output, the other sections still
ran), 2 on bad input (no CUDA without ``--dry-run``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop chatter on stderr (the CPU stand-in)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from auglocal_fx import to_auglocal  # noqa: E402
from auglocal_fx.atomic import atomic_write_text  # noqa: E402
from auglocal_fx.checkpointed import CheckpointedModel, checkpointed  # noqa: E402
from auglocal_fx.cli.common import run_cli  # noqa: E402
from auglocal_fx.errors import AugLocalError  # noqa: E402
from auglocal_fx.models import create_model  # noqa: E402
from auglocal_fx.runtime.memory import allocated_peak  # noqa: E402

PROG = "gpu_suite"
SECTIONS = ("memory", "speed", "accuracy", "compiled")  # the order they run in; compiled takes what is left
RECIPE = "recipes/fashion_mnist_auglocal.yaml"
CK = "bp + checkpointing"
# memory: label -> (what is built, to_auglocal's options)
MEMORY_VARIANTS = {
    "bp": ("bp", {}),
    CK: ("checkpointed", {}),
    "auglocal": ("auglocal", {}),
    "auglocal, balance=memory": ("auglocal", {"balance": "memory"}),
    "auglocal, bf16 aux": ("auglocal", {"aux_dtype": "bfloat16"}),
}
SPEED_VARIANTS = ("bp", CK, "auglocal")  # the paper's split, bf16 autocast, channels_last
RESERVE_S = 5.0  # kept back from the budget for writing the results


@dataclass(frozen=True)
class Sizes:
    model: str
    classes: int
    blocks: int
    size: int
    memory_batches: tuple[int, ...]
    speed_batch: int
    warmup: int
    steps: int
    backend: str  # torch.compile backend of the compiled section
    device: str
    threads: int | None  # torch.set_num_threads while the suite runs; None: torch's choice
    accuracy_epochs: int
    accuracy_overrides: tuple[str, ...]  # on top of RECIPE
    synthetic_limits: tuple[int, int]  # train, test images when Fashion-MNIST is not installed
    # rough seconds one item takes: an item starts only with at least this much of the budget left
    need_memory_s: float
    need_speed_s: float
    need_accuracy_s: float  # per rule
    need_compiled_s: float


FULL = Sizes("resnet50", 1000, 16, 224, (64, 256), 64, 3, 15, "inductor", "cuda", None, 2,
             ("data.num_workers=4",), (5000, 1000), 25.0, 60.0, 90.0, 60.0)
# one thread: at these sizes a second one only waits (and on a shared 2-core machine, spins)
DRY = Sizes("resnet20_cifar", 10, 4, 32, (2, 4), 4, 1, 1, "aot_eager", "cpu", 1, 1,
            ("batch_size=8", "eval_batch_size=16", "conversion.blocks=4", "data.train_limit=16",
             "data.test_limit=16", "data.val_split=0"), (16, 16), 1.0, 1.0, 1.0, 1.0)


class Clock:
    """The budget: seconds left, and whether an item that needs ``need`` seconds still fits."""

    def __init__(self, budget_s: float):
        self.start, self.budget = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - RESERVE_S - self.elapsed()

    def fits(self, need: float) -> bool:
        return self.left() >= need


def _log(*args) -> None:
    """Progress goes to stderr; stdout carries the Markdown."""
    print(f"[{PROG}]", *args, file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# -- building and stepping the variants -------------------------------------------------------------
def _build(base: torch.nn.Module, kind: str, s: Sizes, batch: int, options: dict) -> torch.nn.Module:
    """A fresh copy of ``base`` converted for ``kind`` (bp, auglocal or checkpointed), on the CPU."""
    model = copy.deepcopy(base)
    if kind == "checkpointed":
        return checkpointed(model, s.blocks, input_size=(3, s.size, s.size), batch=batch, **options)
    return to_auglocal(model, s.blocks, rule=kind, input_size=(3, s.size, s.size), batch=batch, **options)


def _stepper(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             amp: torch.dtype | None, device: str) -> Callable[[], None]:
    """One training step of ``net``: a converted net steps its optimizer after each unit's backward
    (what the trainer does); the checkpointed model takes one loss, one backward, one step."""
    if isinstance(net, CheckpointedModel):
        def step() -> None:
            with torch.autocast(device, dtype=amp) if amp else nullcontext():
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss.detach())  # the one host sync bp's training_step has too
        return step
    return lambda: net.training_step(x, y, autocast_dtype=amp, optimizer=opt)


def _compile(net: torch.nn.Module, backend: str) -> None:
    net.compile(backend=backend)  # AugLocalNet and CheckpointedModel: every block (and aux net, head) apart


def _batch(s: Sizes, batch: int, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, s.size, s.size, generator=g)
    y = torch.randint(0, s.classes, (batch,), generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(s.device, memory_format=fmt), y.to(s.device)


def _base(s: Sizes) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(s.model, num_classes=s.classes)


# -- memory ------------------------------------------------------------------------------------------
def _peak_bytes(net: torch.nn.Module, s: Sizes, batch: int) -> int:
    """Bytes live in the allocator at the peak of moving ``net`` onto the device and two training
    steps: ``torch.cuda.max_memory_allocated``; on CPU what is resident plus the profiler's peak."""
    x, y = _batch(s, batch)
    if s.device == "cuda":
        _free("cuda")
        torch.cuda.reset_peak_memory_stats()
        net = net.to("cuda").train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        step = _stepper(net, opt, x, y, None, "cuda")
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    net = net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    step = _stepper(net, opt, x, y, None, "cpu")
    resident = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*net.parameters(), *net.buffers(), x, y)}
    return sum(resident.values()) + allocated_peak(lambda: [step() for _ in range(2)], "cpu")


def memory_section(s: Sizes, clock: Clock) -> dict:
    base = _base(s)
    res = {"model": s.model, "blocks": s.blocks, "size": s.size, "classes": s.classes, "steps": 2,
           "optimizer": "SGD momentum 0.9", "measure": ("torch.cuda.max_memory_allocated" if s.device == "cuda"
                                                        else "CPU stand-in: resident + profiler allocator peak"),
           "batches": {}, "notes": []}
    for batch in s.memory_batches:
        rows = res["batches"][str(batch)] = {}
        for label, (kind, options) in MEMORY_VARIANTS.items():
            if not clock.fits(s.need_memory_s):
                rows[label] = {"peak_bytes": None, "skipped": "budget"}
                res["notes"].append(f"{label} at batch {batch}: skipped, {clock.left():.0f} s of the budget left")
                continue
            _log(f"memory: {label}, batch {batch}")
            start = time.monotonic()
            try:
                rows[label] = {"peak_bytes": _peak_bytes(_build(base, kind, s, batch, options), s, batch)}
            except torch.OutOfMemoryError:
                rows[label] = {"peak_bytes": "OOM"}
                res["notes"].append(f"{label} at batch {batch}: out of memory")
            rows[label]["wall_s"] = time.monotonic() - start
            _free(s.device)
        bp = rows.get("bp", {}).get("peak_bytes")
        for row in rows.values():
            if isinstance(row["peak_bytes"], int) and isinstance(bp, int):
                row["ratio_to_bp"] = row["peak_bytes"] / bp
    return res


# -- step time ---------------------------------------------------------------------------------------
def time_steps(steps: dict[str, Callable[[], None]], warmup: int, timed: int, device: str, deadline: float,
               on_first: Callable[[str, float], None] = lambda v, t: None) -> tuple[dict, list[str]]:
    """Run the ``steps`` interleaved, ``warmup`` rounds then up to ``timed`` rounds (fewer past
    ``deadline``, a ``time.monotonic()``, once one round is timed); per variant the median step,
    the first step (where a compiled one compiles) and the count of timed steps."""
    times: dict[str, list[float]] = {v: [] for v in steps}
    first: dict[str, float] = {}
    notes = []
    for i in range(warmup + timed):
        if i > warmup and time.monotonic() > deadline:
            notes.append(f"timed {i - warmup} of {timed} steps per variant: the budget ran out")
            break
        for v, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            took = time.perf_counter() - start
            if v not in first:
                first[v] = took
                on_first(v, took)
            if i >= warmup:
                times[v].append(took)
    rows = {v: {"median_step_s": statistics.median(t), "first_step_s": first[v], "timed_steps": len(t)}
            for v, t in times.items()}
    for row in rows.values():
        row["ratio_to_bp"] = row["median_step_s"] / rows["bp"]["median_step_s"]
    return rows, notes


def speed_rows(s: Sizes, compiled: bool, deadline: float, on_first=lambda v, t: None) -> tuple[dict, list[str]]:
    """bp, bp + checkpointing and auglocal at ``s.speed_batch``, bf16 autocast, channels_last,
    eager or compiled with ``s.backend``, timed interleaved."""
    base = _base(s)
    x, y = _batch(s, s.speed_batch, channels_last=True)
    steps, graphs = {}, {}
    for label in SPEED_VARIANTS:
        kind = "checkpointed" if label == CK else label
        net = _build(base, kind, s, s.speed_batch, {}).to(s.device, memory_format=torch.channels_last).train()
        if compiled:
            _compile(net, s.backend)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        steps[label] = _stepper(net, opt, x, y, torch.bfloat16, s.device)
        if compiled:
            steps[label] = _counting_graphs(steps[label], label, graphs)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        rows, notes = time_steps(steps, s.warmup, s.steps, s.device, deadline, on_first)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    for label, n in graphs.items():  # compiled: the graphs each variant's steps made (none fell back to eager)
        rows[label]["graphs"] = n
    return rows, notes


def _counting_graphs(step: Callable[[], None], label: str, graphs: dict) -> Callable[[], None]:
    """``step``, adding the graphs torch.compile makes during it to ``graphs[label]``."""
    from torch._dynamo.utils import counters

    def run() -> None:
        before = counters["stats"]["unique_graphs"]
        step()
        graphs[label] = graphs.get(label, 0) + counters["stats"]["unique_graphs"] - before
    return run


def _speed_header(s: Sizes) -> dict:
    return {"model": s.model, "blocks": s.blocks, "size": s.size, "batch": s.speed_batch, "autocast": "bfloat16",
            "channels_last": True, "cudnn_benchmark": s.device == "cuda", "warmup": s.warmup, "steps": s.steps}


def speed_section(s: Sizes, clock: Clock) -> dict:
    res = {**_speed_header(s), "rows": {}, "notes": []}
    if not clock.fits(s.need_speed_s):
        res["notes"].append(f"skipped: {clock.left():.0f} s of the budget left")
        return res
    _log(f"speed: eager, batch {s.speed_batch}")
    res["rows"], res["notes"] = speed_rows(s, False, time.monotonic() + clock.left())
    _free(s.device)
    return res


def compiled_section(s: Sizes, clock: Clock, dry_run: bool, eager: dict | None) -> dict:
    """The compiled variants in a child process (this file with ``--compiled-child``), killed when
    the budget runs out: compiling is the one part whose time cannot be told in advance."""
    res = {**_speed_header(s), "backend": s.backend, "rows": {}, "first_step_s": {}, "notes": []}
    if not clock.fits(s.need_compiled_s):
        res["notes"].append(f"skipped: {clock.left():.0f} s of the budget left")
        return res
    _free(s.device)
    timeout = clock.left()
    spec = json.dumps({"dry_run": dry_run, "speed_batch": s.speed_batch,
                       "seconds": max(1.0, timeout - 2 * s.need_compiled_s / 3)})
    _log(f"compiled ({s.backend}): batch {s.speed_batch}, at most {timeout:.0f} s")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compiled-child", spec]
    # output to files, not pipes: compile workers the child starts could hold a pipe open after it is
    # killed; its own session, so that killing it on time-out takes them with it
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            res["notes"].append(f"stopped after {timeout:.0f} s: the budget ran out (compiling took longer)")
        finally:
            if proc.poll() is None:  # timed out, or this process was interrupted
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    sys.stderr.write(stderr)
    for line in stdout.splitlines():  # one JSON object per line: each compiled first step, then the rows
        if line.startswith("{"):
            msg = json.loads(line)
            res["first_step_s"].update(msg.get("first_step_s", {}))
            res["rows"] = msg.get("rows", res["rows"])
            res["notes"] += msg.get("notes", [])
    if code not in (0, None):  # keep what it measured before it failed; the failure is a note and an error
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
        res["error"] = f"the compiled child exited with {code}: {tail}"
    for label, row in res["rows"].items():
        if eager and label in eager:
            row["compiled_over_eager"] = row["median_step_s"] / eager[label]["median_step_s"]
    return res


def _compiled_child(spec: str) -> int:
    args = json.loads(spec)
    s = replace(DRY if args["dry_run"] else FULL, speed_batch=args["speed_batch"])
    if s.threads:
        torch.set_num_threads(s.threads)
    deadline = time.monotonic() + args["seconds"]

    def first(label: str, took: float) -> None:
        print(json.dumps({"first_step_s": {label: took}}), flush=True)
        _log(f"compiled {label}: first step (compiling) {took:.1f} s")

    rows, notes = speed_rows(s, True, deadline, first)
    print(json.dumps({"rows": rows, "notes": notes}), flush=True)
    return 0


# -- accuracy ----------------------------------------------------------------------------------------
def fashion_mnist_installed() -> bool:
    """Whether the offline Fashion-MNIST (Debian's dataset-fashion-mnist) is where the trainer looks."""
    from auglocal_fx.training.data import DATASETS

    root = Path(DATASETS["fashion_mnist"].default_root)
    return all((root / f"{split}-{kind}-ubyte").is_file() or (root / f"{split}-{kind}-ubyte.gz").is_file()
               for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))


def accuracy_section(s: Sizes, clock: Clock) -> dict:
    from auglocal_fx.training import load_recipe, train  # heavy: only when it trains

    fashion = fashion_mnist_installed()
    overrides = [f"epochs={s.accuracy_epochs}", f"device={s.device}", *s.accuracy_overrides]
    if not fashion:
        train_n, test_n = s.synthetic_limits
        overrides += ["data.dataset=synthetic", f"data.train_limit={train_n}", f"data.test_limit={test_n}"]
    res = {"recipe": RECIPE, "dataset": "fashion_mnist" if fashion else "synthetic", "overrides": overrides,
           "epochs": s.accuracy_epochs, "rules": {}, "notes": []}
    need = s.need_accuracy_s
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as tmp:
        for rule in ("bp", "auglocal"):
            if not clock.fits(need):
                res["notes"].append(f"{rule}: skipped, {clock.left():.0f} s of the budget left")
                continue
            recipe = load_recipe(str(ROOT / RECIPE), [*overrides, f"conversion.rule={rule}", f"output={tmp}/{rule}"])
            res.update(model=recipe.model.label, blocks=recipe.conversion.blocks, batch=recipe.batch_size)
            _log(f"accuracy: {rule} on {res['dataset']}, {s.accuracy_epochs} epoch(s)")
            start = time.monotonic()
            summary = train(recipe, log=lambda *a, **k: _log(*a))
            wall = time.monotonic() - start
            need = max(need, 1.2 * wall)  # the next rule takes about as long
            res["rules"][rule] = {"test_acc": summary["test_acc"], "train_time_s": summary["train_time_s"],
                                  "wall_s": wall, "blocks": summary["blocks"], "selected_on": summary["selected_on"]}
            _free(s.device)
    if len(res["rules"]) == 2:
        res["auglocal_minus_bp_points"] = 100 * (res["rules"]["auglocal"]["test_acc"] - res["rules"]["bp"]["test_acc"])
    return res


# -- the report --------------------------------------------------------------------------------------
def _gib(n) -> str:
    if n is None:
        return "skipped"
    return n if isinstance(n, str) else (f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB")


def _x(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if isinstance(row.get(key), float) else "-"


def _ms(row: dict | None, key: str = "median_step_s") -> str:
    return f"{1000 * row[key]:.1f}" if row and key in row else "-"


def markdown(res: dict) -> str:
    sec = res["sections"]
    walls = ", ".join(f"{name} {sec[name]['wall_s']:.0f} s" for name in SECTIONS if name in sec)
    where = f"on {res['device']}" if not res["dry_run"] else "dry run on CPU (tiny sizes: the figures mean nothing)"
    if res.get("device_memory_gib"):
        where += f" ({res['device_memory_gib']:.0f} GiB)"
    lines = [f"### GPU suite {where} (measured {res['date']})", "",
             f"`{res['command']}`: torch {res['torch']}, CUDA {res['cuda'] or '-'}; {res['wall_s']:.0f} s of the "
             f"{res['budget_s']:.0f} s budget ({walls}).", ""]
    m = sec.get("memory")
    if m and "batches" in m:
        batches = list(m["batches"])
        measure = f"`{m['measure']}`" if m["measure"].startswith("torch.") else m["measure"]
        lines += [f"**Memory**: {measure} over moving the net onto the device and {m['steps']} training steps "
                  f"({m['optimizer']}), {m['model']} K={m['blocks']} at {m['size']} px, fp32.", "",
                  "| variant | " + " | ".join(f"batch {b} | ratio to bp" for b in batches) + " |",
                  "|---|" + "---:|---:|" * len(batches)]
        for label in MEMORY_VARIANTS:
            cells = []
            for b in batches:
                row = m["batches"][b].get(label, {"peak_bytes": None})
                cells += [_gib(row["peak_bytes"]), _x(row, "ratio_to_bp")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    sp, co = sec.get("speed"), sec.get("compiled")
    head = next((x for x in (sp, co) if x and "steps" in x), None)  # a failed section holds no header
    if head is not None:
        eager, comp = (sp or {}).get("rows", {}), (co or {}).get("rows", {})
        first = (co or {}).get("first_step_s", {})
        backend = (co or {}).get("backend", "-")
        lines += [f"**Step time**: median of {head['steps']} interleaved steps ({head['warmup']} warm-up), "
                  f"{head['model']} K={head['blocks']}, batch {head['batch']} at {head['size']} px, bf16 autocast, "
                  "channels_last" + (", cudnn.benchmark" if head["cudnn_benchmark"] else "")
                  + f"; compiled: `net.compile(backend=\"{backend}\")`.", "",
                  "| variant | eager ms/step | ratio to bp | compiled ms/step | ratio to compiled bp "
                  "| compiled / eager | first compiled step |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for label in SPEED_VARIANTS:
            e, c = eager.get(label), comp.get(label)
            lines.append(f"| {label} | {_ms(e)} | {_x(e or {}, 'ratio_to_bp')} | {_ms(c)} | "
                         f"{_x(c or {}, 'ratio_to_bp')} | {_x(c or {}, 'compiled_over_eager')} | "
                         + (f"{first[label]:.1f} s" if label in first else "-")
                         + (f" ({c['graphs']} graphs)" if c and "graphs" in c else "") + " |")
        lines.append("")
    a = sec.get("accuracy")
    if a and "rules" in a:
        data = "Fashion-MNIST" if a["dataset"] == "fashion_mnist" else "the synthetic set (Fashion-MNIST is not installed)"
        lines += [f"**Accuracy**: `{a['recipe']}` ({a.get('model', '-')}, K={a.get('blocks', '-')}, batch "
                  f"{a.get('batch', '-')}), {a['epochs']} epoch(s) on {data}, only `conversion.rule` differs.", "",
                  "| rule | test accuracy | training time |", "|---|---:|---:|"]
        for rule, r in a["rules"].items():
            lines.append(f"| {rule} | {100 * r['test_acc']:.2f}% | {r['train_time_s']:.1f} s |")
        if "auglocal_minus_bp_points" in a:
            lines += ["", f"auglocal minus bp: {a['auglocal_minus_bp_points']:+.2f} points."]
        lines.append("")
    notes = [f"{name}: {n}" for name in SECTIONS if name in sec for n in sec[name].get("notes", [])]
    notes += [f"{name}: failed: {sec[name]['error']}" for name in SECTIONS if name in sec and "error" in sec[name]]
    if notes:
        lines += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------------------
def _device_name(s: Sizes) -> str:
    if s.device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_suite", help="folder for gpu_suite.json and gpu_suite.md")
    p.add_argument("--dry-run", action="store_true", help="on CPU at tiny sizes: every code path, figures meaningless")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget in seconds (default 480)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help=f"which parts to run (default all: {' '.join(SECTIONS)})")
    p.add_argument("--speed-batch", type=int, default=None,
                   help="batch of the speed and compiled sections (default 64; at 64 an H200's eager step is "
                        "bound by kernel launches, so a larger batch shows the arithmetic's share)")
    p.add_argument("--compiled-child", help=argparse.SUPPRESS)  # the compiled section, in its own process
    args = p.parse_args(argv)
    if args.compiled_child:
        return _compiled_child(args.compiled_child)
    if args.budget_s <= 0:
        raise AugLocalError(f"--budget-s {args.budget_s:g} is not positive; give the seconds the suite may take")
    if not args.dry_run and not torch.cuda.is_available():
        raise AugLocalError("CUDA is not available on this machine; run on a GPU, or pass --dry-run to exercise "
                            "the suite on CPU at tiny sizes")
    if args.speed_batch is not None and args.speed_batch < 1:
        raise AugLocalError(f"--speed-batch {args.speed_batch} is not positive; give the batch the speed sections train")
    s = DRY if args.dry_run else FULL
    if args.speed_batch:
        s = replace(s, speed_batch=args.speed_batch)
    clock = Clock(args.budget_s)
    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    res = {"suite": PROG, "dry_run": args.dry_run, "device": _device_name(s), "torch": torch.__version__,
           "cuda": torch.version.cuda if s.device == "cuda" else None, "date": datetime.date.today().isoformat(),
           "command": " ".join(["python tools/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
           "budget_s": args.budget_s, "sizes": asdict(s), "sections": {}}
    if s.device == "cuda":
        res["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    failed = False
    try:
        for name in (n for n in SECTIONS if n in args.sections):
            start = time.monotonic()
            try:
                if name == "memory":
                    out = memory_section(s, clock)
                elif name == "speed":
                    out = speed_section(s, clock)
                elif name == "accuracy":
                    out = accuracy_section(s, clock)
                else:
                    out = compiled_section(s, clock, args.dry_run, res["sections"].get("speed", {}).get("rows"))
            except Exception as exc:  # one section's failure must not cost the others' figures
                traceback.print_exc()
                out, failed = {"error": _one_line(exc), "notes": []}, True
                _free(s.device)
            out["wall_s"] = time.monotonic() - start
            failed = failed or "error" in out  # the compiled child's failure too
            res["sections"][name] = out
    finally:
        torch.set_num_threads(threads)
    res["wall_s"] = clock.elapsed()
    out_dir = Path(args.out)
    atomic_write_text(out_dir / "gpu_suite.json", json.dumps(res, indent=1) + "\n")  # first: the figures
    text = markdown(res)
    atomic_write_text(out_dir / "gpu_suite.md", text)
    print(text)
    _log(f"wrote {out_dir / 'gpu_suite.json'} and {out_dir / 'gpu_suite.md'} in {res['wall_s']:.0f} s")
    return 1 if failed else 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
