"""Every way to train one model on one CUDA device, side by side: step time and memory.

    python tools/bench_gpu.py --device cuda --out runs/bench_gpu                  # every setting
    python tools/bench_gpu.py --device cuda --settings resnet50 resnet32_cifar --reference-dir ~/src/AugLocal
    python tools/bench_gpu.py --dry-run --out /tmp/bg     # on the CPU at tiny sizes: every code path

Settings (``--settings``): resnet50 K=16 at 224 px, batch 64 and 256 (1000 classes);
vit_small_patch16_224 K=12, batch 64 and 256; CIFAR ResNet-32 K=16 with aux depth 3 and pyramid
0.5 split as the authors' code splits it (``tail="reference"``), batch 1024, 10 classes.

Variants, each with bf16 autocast and channels_last weights and inputs (``cudnn.benchmark`` on):

- ``bp``: backprop, one fused SGD; ``bp + checkpointing``: activation checkpointing at the same K
  block boundaries (``checkpointed.py``); ``bp, compiled``: ``torch.compile(mode="reduce-overhead")``
  (inductor with CUDA graphs), the first steps compile;
- ``auglocal, one optimizer``: one SGD over the whole net stepped after every unit (each step walks
  every parameter); ``auglocal``: each unit's own fused SGD (``net.unit_optimizers``);
- ``auglocal + graphs`` (``net.capture``: each unit's whole step one CUDA graph), ``auglocal +
  overlap`` (two streams), ``auglocal + offload`` (aux nets in pinned host memory but for two), and
  offload with the memory options: ``balance=memory`` and bf16 aux nets, and with
  ``recompute=block`` too;
- ``reference``: the authors' ``LocalResNet`` (``--reference-dir``, CIFAR ResNet-32 only; see
  ``reference_peer.py``), stepped as their ``train.py`` steps it.

Each variant runs alone on the card, in turn: built, moved on, ``--warmup`` steps (graphs capture
after two of them), then ``--steps`` timed steps; its figures are the median step time (ratio to
bp's) and ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over all of it (peaks reset
before it is built; the previous variant freed). On a card with nothing beside it, timing the
variants in turn rather than interleaved costs nothing in accuracy and lets each peak be its own.
A variant that runs out of memory is recorded as ``OOM``, one that fails otherwise as ``failed`` with
its error's first line (the others still run); one that would not fit the time left of
``--budget-s`` is skipped with a note. Results go to ``OUT/bench_gpu.json`` and ``OUT/bench_gpu.md``
after every variant (atomically), so a run cut short keeps what it measured.

``--dry-run`` runs every variant on the CPU at tiny sizes (CIFAR ResNet-20, K=4, batch 4) with the
CPU stand-ins of ``auglocal_fx.testing.stand_ins`` in place of CUDA graphs, streams and pinned
transfers, and ``torch.compile(backend="eager")``: the code paths, not figures (the slow tier runs it, in CI).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from auglocal_fx import to_auglocal  # noqa: E402
from auglocal_fx.atomic import atomic_write_text  # noqa: E402
from auglocal_fx.checkpointed import checkpointed  # noqa: E402
from auglocal_fx.cli.common import run_cli  # noqa: E402
from auglocal_fx.errors import AugLocalError, first_line  # noqa: E402
from auglocal_fx.models import create_model  # noqa: E402
from auglocal_fx.runtime.graphs import CapturedStep  # noqa: E402
from auglocal_fx.runtime.offload import AuxOffload  # noqa: E402
from auglocal_fx.runtime.overlap import overlapped_step  # noqa: E402
from auglocal_fx.runtime.unit_optim import fused_kwargs  # noqa: E402
from auglocal_fx.testing.stand_ins import GraphsStandIn, StreamsStandIn, TransfersStandIn  # noqa: E402

PROG = "bench_gpu"
LR = 1e-3


@dataclass(frozen=True)
class Setting:
    model: str
    blocks: int
    aux_depth: int
    pyramid: float
    size: int
    classes: int
    batches: tuple[int, ...]
    tail: str = "exact"
    reference: bool = False  # the authors' LocalResNet has this model


SETTINGS = {
    "resnet50": Setting("resnet50", 16, 2, 0.5, 224, 1000, (64, 256)),
    "vit_small_patch16_224": Setting("vit_small_patch16_224", 12, 2, 0.5, 224, 1000, (64, 256)),
    "resnet32_cifar": Setting("resnet32_cifar", 16, 3, 0.5, 32, 10, (1024,), tail="reference", reference=True),
}
DRY = Setting("resnet20_cifar", 4, 2, 0.5, 32, 10, (4,))


@dataclass
class Ctx:
    """What every variant is built from: one setting at one batch, on one device."""

    setting: Setting
    batch: int
    device: torch.device
    dry: bool
    base: torch.nn.Module  # the model, on the CPU, copied for each variant
    x: torch.Tensor
    y: torch.Tensor
    reference_dir: str | None

    def net(self, rule: str = "auglocal", **options):
        s = self.setting
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = to_auglocal(copy.deepcopy(self.base), s.blocks, rule=rule, aux_depth=s.aux_depth, pyramid=s.pyramid,
                              tail=s.tail if rule == "auglocal" else "exact", input_size=(3, s.size, s.size),
                              batch=self.batch, **options)
        return _placed(net, self.device).train()

    def sgd(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=LR, momentum=0.9, **fused_kwargs(torch.optim.SGD, self.device))

    def amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def _placed(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return module.to(device, memory_format=torch.channels_last)


# -- the variants: each returns one training step of its own --------------------------------------
def _bp(c: Ctx) -> Callable[[], None]:
    net = c.net("bp")
    opt = c.sgd(net.parameters())
    return lambda: net.training_step(c.x, c.y, autocast_dtype=torch.bfloat16, optimizer=opt)


def _one_loss(c: Ctx, model, opt, compiled: bool = False) -> Callable[[], None]:
    def step() -> None:
        if compiled:  # a new step for torch.compile's CUDA graphs: the last step's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with c.amp():
            loss = F.cross_entropy(model(c.x), c.y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the one host sync the other variants' steps have too
    return step


def _checkpointing(c: Ctx) -> Callable[[], None]:
    s = c.setting
    model = _placed(checkpointed(copy.deepcopy(c.base), s.blocks, input_size=(3, s.size, s.size), batch=c.batch),
                    c.device).train()
    return _one_loss(c, model, c.sgd(model.parameters()))


def _compiled(c: Ctx) -> Callable[[], None]:
    model = _placed(copy.deepcopy(c.base), c.device).train()
    compiled = torch.compile(model, backend="eager") if c.dry else torch.compile(model, mode="reduce-overhead")
    return _one_loss(c, compiled, c.sgd(model.parameters()), compiled=True)


def _one_optimizer(c: Ctx) -> Callable[[], None]:
    net = c.net()
    opt = c.sgd(net.parameters())
    return lambda: net.training_step(c.x, c.y, autocast_dtype=torch.bfloat16, optimizer=opt)


def _unit_optimizers(c: Ctx, **options):
    net = c.net(**options)
    return net, net.unit_optimizers(torch.optim.SGD, lr=LR, momentum=0.9)


def _auglocal(c: Ctx) -> Callable[[], None]:
    net, opt = _unit_optimizers(c)
    return lambda: net.training_step(c.x, c.y, autocast_dtype=torch.bfloat16, optimizer=opt)


def _graphs(c: Ctx) -> Callable[[], None]:
    net, opt = _unit_optimizers(c)
    step = CapturedStep(net.local_units(), opt, (c.x, c.y), autocast_dtype=torch.bfloat16, warmup=2,
                        log=lambda _: None, backend=GraphsStandIn() if c.dry else None)
    return lambda: float(step(c.x, c.y).loss)  # the sync the eager steps make reading their losses


def _overlap(c: Ctx, offload: bool = False, **options) -> Callable[[], None]:
    net, opt = _unit_optimizers(c, **options)
    off = _offload(c, net, opt) if offload else None
    streams = StreamsStandIn() if c.dry else None
    return lambda: overlapped_step(net.local_units(), c.x, c.y, autocast_dtype=torch.bfloat16, optimizer=opt,
                                   offload=off, streams=streams)


def _offload(c: Ctx, net, opt) -> AuxOffload:
    return AuxOffload(net.local_units(), opt, c.device, transfers=TransfersStandIn() if c.dry else None)


def _offloaded(c: Ctx, **options) -> Callable[[], None]:
    net, opt = _unit_optimizers(c, **options)
    off = _offload(c, net, opt)
    return lambda: net.training_step(c.x, c.y, autocast_dtype=torch.bfloat16, optimizer=opt, offload=off)


def _reference(c: Ctx) -> Callable[[], None]:
    import reference_peer

    s = c.setting
    net = _placed(reference_peer.build_reference(c.reference_dir, s.model, s.blocks, s.aux_depth, s.pyramid, c.batch,
                                                 s.classes), c.device).train()
    opt = c.sgd(net.parameters())

    def step() -> None:
        with c.amp():
            reference_peer.step(net, opt, c.x, c.y)
    return step


VARIANTS: dict[str, Callable[[Ctx], Callable[[], None]]] = {
    "bp": _bp,
    "bp + checkpointing": _checkpointing,
    "bp, compiled (reduce-overhead)": _compiled,
    "auglocal, one optimizer": _one_optimizer,
    "auglocal": _auglocal,
    "auglocal + graphs": _graphs,
    "auglocal + overlap": _overlap,
    "auglocal + offload": _offloaded,
    "auglocal + offload + overlap": lambda c: _overlap(c, offload=True),
    "auglocal + offload, balance=memory, bf16 aux": lambda c: _offloaded(c, balance="memory", aux_dtype="bfloat16"),
    # every memory option at once: the plan's estimate for resnet50 K=16 at batch 64 is 0.21x bp's
    "auglocal + offload, balance=memory, recompute=block, bf16 aux":
        lambda c: _offloaded(c, balance="memory", recompute="block", aux_dtype="bfloat16"),
    "reference": _reference,
}


# -- measuring -------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_variant(c: Ctx, label: str, warmup: int, steps: int) -> dict:
    """One variant alone: build, ``warmup`` steps, ``steps`` timed; its median and its peaks."""
    _free(c.device)
    start, step = time.monotonic(), None
    try:
        step = VARIANTS[label](c)
        times = []
        for i in range(warmup + steps):
            _sync(c.device)
            t0 = time.perf_counter()
            step()
            _sync(c.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        row = {"median_step_s": statistics.median(times), "timed_steps": len(times)}
        if c.device.type == "cuda":
            row.update(max_allocated=torch.cuda.max_memory_allocated(c.device),
                       max_reserved=torch.cuda.max_memory_reserved(c.device))
    except torch.OutOfMemoryError:
        row = {"median_step_s": "OOM"}
    except Exception as exc:  # noqa: BLE001  one variant's failure (a capture that fails) costs only its row
        row = {"median_step_s": "failed", "error": first_line(exc, 300)}
    row["wall_s"] = time.monotonic() - start
    del step
    return row


def run(args, device: torch.device) -> dict:
    settings = [DRY] if args.dry_run else [SETTINGS[name] for name in args.settings]
    deadline = time.monotonic() + args.budget_s
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}), "
           "dry run: stand-ins, figures meaningless",
           "torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.date.today().isoformat(),
           "warmup": args.warmup, "steps": args.steps, "autocast": "bfloat16", "channels_last": True,
           "settings": [], "notes": []}
    torch.backends.cudnn.benchmark = device.type == "cuda"
    for s in settings:
        torch.manual_seed(0)
        base = create_model(s.model, num_classes=s.classes)
        for batch in s.batches:
            g = torch.Generator().manual_seed(1)
            x = torch.randn(batch, 3, s.size, s.size, generator=g).to(device, memory_format=torch.channels_last)
            y = torch.randint(0, s.classes, (batch,), generator=g).to(device)
            c = Ctx(s, batch, device, args.dry_run, base, x, y, args.reference_dir)
            entry = {**asdict(s), "batch": batch, "rows": {}}
            res["settings"].append(entry)
            for label in VARIANTS:
                if label == "reference" and not (s.reference and args.reference_dir):
                    continue
                if time.monotonic() > deadline:
                    res["notes"].append(f"{s.model} batch {batch} {label}: skipped, the budget ran out")
                    continue
                print(f"{PROG}: {s.model} K={s.blocks} batch {batch}: {label}", file=sys.stderr, flush=True)
                entry["rows"][label] = measure_variant(c, label, args.warmup, args.steps)
                _ratios(entry["rows"])
                _write(args.out, res)
            del c, x, y
            _free(device)
    return res


def _ratios(rows: dict) -> None:
    bp = rows.get("bp", {})
    for row in rows.values():
        for key, base in (("median_step_s", "step_vs_bp"), ("max_allocated", "allocated_vs_bp")):
            if isinstance(row.get(key), float | int) and isinstance(bp.get(key), float | int):
                row[base] = row[key] / bp[key]


def markdown(res: dict) -> str:
    lines = [f"{res['device']}, torch {res['torch']} (CUDA {res['cuda']}), {res['date']}; bf16 autocast, "
             f"channels_last; median of {res['steps']} steps after {res['warmup']}; each variant alone on the card."]
    for e in res["settings"]:
        lines += ["", f"**{e['model']} K={e['blocks']} (aux depth {e['aux_depth']}, pyramid {e['pyramid']}, tail "
                      f"{e['tail']}), {e['size']} px, batch {e['batch']}**", "",
                  "| variant | ms/step | vs bp | max allocated GiB | vs bp | max reserved GiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, r in e["rows"].items():
            t = r["median_step_s"]
            ms = f"{1000 * t:.1f}" if isinstance(t, float) else str(t)
            lines.append(f"| {label} | {ms} | {_cell(r, 'step_vs_bp', 'x')} | {_cell(r, 'max_allocated', 'GiB')} | "
                         f"{_cell(r, 'allocated_vs_bp', 'x')} | {_cell(r, 'max_reserved', 'GiB')} |")
    lines += [f"- {n}" for n in res["notes"]]
    lines += [f"- {e['model']} batch {e['batch']} {label}: {r['error']}" for e in res["settings"]
              for label, r in e["rows"].items() if "error" in r]
    return "\n".join(lines) + "\n"


def _cell(row: dict, key: str, unit: str) -> str:
    if key not in row:
        return "-"
    return f"{row[key]:.2f}x" if unit == "x" else f"{row[key] / 2**30:.2f}"


def _write(out: str, res: dict) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "bench_gpu.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(folder / "bench_gpu.md", markdown(res))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cuda:N")
    p.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes with stand-ins: every code path")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), metavar="MODEL",
                   help=f"which settings (default all: {', '.join(SETTINGS)})")
    p.add_argument("--reference-dir", metavar="DIR", help="a checkout of ChenxiangMA/AugLocal: the reference row")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps per variant (default 4; graphs capture at 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    p.add_argument("--budget-s", type=float, default=3600.0, help="skip what would start after this many seconds")
    p.add_argument("--out", default="runs/bench_gpu", help="folder for bench_gpu.json and bench_gpu.md")
    args = p.parse_args(argv)

    def body() -> int:
        if args.warmup < 3:
            raise AugLocalError(f"--warmup {args.warmup}: the graphs variant captures at its third step; give 3 or more")
        if args.dry_run:
            device = torch.device("cpu")
            torch.set_num_threads(1)
        else:
            device = torch.device(args.device)
            if device.type != "cuda" or not torch.cuda.is_available():
                raise AugLocalError(f"--device {args.device}: no CUDA device here; run it on a GPU, or --dry-run "
                                    "for the code paths on the CPU")
        if args.reference_dir:
            import reference_peer

            reference_peer.load_reference(args.reference_dir)  # a wrong directory fails now, in one line
        res = run(args, device)
        _write(args.out, res)
        print(markdown(res))
        return 0

    return run_cli(PROG, body, p)


if __name__ == "__main__":
    sys.exit(main())
