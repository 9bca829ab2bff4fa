"""Memory of training, bp vs dgl vs auglocal as ratios to bp: the activations autograd saves, and
the whole step's total (weights + gradients + optimizer state + activations).

    python tools/bench_memory.py                       # both parts, on the default settings below
    python tools/bench_memory.py --part total --model resnet50 --blocks 16 --size 224 --batch 8 32
    python tools/bench_memory.py --part activations --model resnet50 --blocks 16 --size 224 --batch 8

Part ``activations`` (in this process; timm resnet50 K=16 d=2 224 px batch 8, CIFAR ResNet-32 K=16
batch 128, ResNet-110 K=55 d=3 batch 128, the paper's splits): the bytes autograd saves for backward,
alive at once, deduplicated by storage, the network's parameters left out ("with weights" counts
them too); for auglocal also the planner's estimate (``unit_act_bytes`` x batch). Rows: bp, dgl,
auglocal by equal layer counts (the paper) and by ``balance=memory``.

Part ``total`` (resnet50 K=16 at batches 8, 32, 128; ResNet-32 K=16 at the paper's batch 1024):
what a user watches. Each row runs in a fresh process that builds the model, converts it and runs
two training steps with SGD + momentum, measured three ways:

- ``allocated``: the peak of bytes live in PyTorch's allocator (weights, gradients, optimizer
  state, activations, workspace): on a GPU ``torch.cuda.max_memory_allocated``; on CPU the bytes
  resident before the steps plus the peak of the CPU allocator's running total during them, as
  ``torch.profiler`` (``profile_memory=True``) reports it with every allocation;
- ``peak RSS``: the whole process (``getrusage``: allocator caches and the Python runtime too),
  beside the RSS of the imports alone;
- ``estimate``: ``costs.estimate_footprint``, the planner's figure (what ``balance=memory``
  minimises), with its breakdown.

Rows: bp; bp with activation checkpointing at the plan's K block boundaries (``checkpointed.py``)
and with timm's own ``set_grad_checkpointing()`` (where the family has it; no estimate); dgl;
auglocal with one optimizer step at the end; auglocal with per-unit steps (the trainer's default)
and, on top, ``balance=memory``, ``recompute=block``, ``recompute=aux``, ``aux_dtype=bfloat16``, and
recompute=block with bfloat16 aux nets. The crossover batch is the smallest batch at which
auglocal's estimated total (per-unit steps) falls below bp's.

``--reference-dir DIR`` (part total) adds the paper authors' own implementation, their
``LocalResNet`` from a checkout of ChenxiangMA/AugLocal at DIR (``reference_peer.py``), measured
as every other row (a fresh process, allocated and peak RSS; no estimate: it has no plan), stepped
as their ``train.py`` steps it: one optimizer step at the end. Beside it, the row of ours that does
the same work: auglocal with their split (``tail=reference``, M = K - d) and one step at the end.
Their code has the CIFAR ResNets only, at K = the layer count; ``--aux-depth`` and ``--pyramid``
set both, e.g. their ``run.sh``'s ResNet-32:

    python tools/bench_memory.py --part total --model resnet32_cifar --blocks 16 --aux-depth 3 --size 32 --batch 1024 --rows bp --reference-dir DIR
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # reference_peer, beside this file

import reference_peer  # noqa: E402

from auglocal_fx import to_auglocal  # noqa: E402
from auglocal_fx.checkpointed import checkpointed  # noqa: E402
from auglocal_fx.cli.common import run_cli  # noqa: E402
from auglocal_fx.costs import (  # noqa: E402
    bp_footprint,
    checkpointed_footprint,
    crossover_batch,
    estimate_footprint,
    unit_act_bytes,  # noqa: E402
)
from auglocal_fx.errors import AugLocalError  # noqa: E402
from auglocal_fx.models import create_model  # noqa: E402
from auglocal_fx.rules import get_rule  # noqa: E402
from auglocal_fx.runtime.memory import SavedTensorMeter, allocated_peak, peak_rss_bytes  # noqa: E402

SETTINGS = (  # part "activations": model, K, d, size, batch
    ("resnet50", 16, 2, 224, 8),
    ("resnet32_cifar", 16, 2, 32, 128),
    ("resnet110_cifar", 55, 3, 32, 128),
)
VARIANTS = (("bp", "bp", "layers"), ("dgl", "dgl", "layers"), ("auglocal", "auglocal", "layers"),
            ("auglocal/memory", "auglocal", "memory"))
TOTAL_SETTINGS = (("resnet50", 16, 224, (8, 32, 128)), ("resnet32_cifar", 16, 32, (1024,)))
# part "total": label -> rule, optimizer step per unit, and to_auglocal's memory options
TOTAL_ROWS = {
    "bp": ("bp", True, {}),
    "bp + checkpointing at the K blocks": ("checkpointed", True, {}),
    "bp + timm set_grad_checkpointing": ("timm-checkpointing", True, {}),
    "dgl": ("dgl", True, {}),
    "auglocal, one step at the end": ("auglocal", False, {}),
    "auglocal": ("auglocal", True, {}),
    "auglocal, balance=memory": ("auglocal", True, {"balance": "memory"}),
    "auglocal, recompute=block": ("auglocal", True, {"recompute": "block"}),
    "auglocal, recompute=aux": ("auglocal", True, {"recompute": "aux"}),
    "auglocal, bf16 aux": ("auglocal", True, {"aux_dtype": "bfloat16"}),
    "auglocal, recompute=block + bf16 aux": ("auglocal", True, {"recompute": "block", "aux_dtype": "bfloat16"}),
    # --reference-dir: the authors' LocalResNet, and ours doing the same work (their split, one step)
    "auglocal, tail=reference, one step at the end": ("auglocal", False, {"tail": "reference"}),
    "auglocal, tail=reference": ("auglocal", True, {"tail": "reference"}),  # as the trainer steps it
    "reference (authors' LocalResNet)": ("reference", False, {}),
}
REFERENCE = "reference (authors' LocalResNet)"
REFERENCE_ROWS = ("auglocal, tail=reference, one step at the end", "auglocal, tail=reference",
                  REFERENCE)  # not in the default rows
PROG = "bench_memory.py"


# -- part "activations" ---------------------------------------------------------------------------
def measure(model_name: str, blocks: int, aux_depth: int, size: int, batch: int, pyramid: float = 0.5,
            device: str = "cpu") -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    rows = {}
    for label, rule, balance in VARIANTS:
        net = to_auglocal(model, blocks=blocks, rule=rule, aux_depth=aux_depth, pyramid=pyramid,
                          balance=balance, input_size=(3, size, size), batch=batch).to(device).train()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with SavedTensorMeter(exclude=net.parameters()) as meter:
            net.training_step(x, y)
        row = {"blocks": len(net.blocks), "activations": meter.peak, "with_weights": meter.peak_all,
               "aux_params": sum(p.numel() for p in net.aux_parameters())}
        if get_rule(rule).copies_layers:  # the planner models aux nets made of copies of profiled layers only
            row["estimate"] = batch * max(unit_act_bytes(net.plan))
        if device == "cuda":
            row["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        rows[label] = row
        net.zero_grad(set_to_none=True)
        del net
    for r in rows.values():
        for key in ("activations", "with_weights", "cuda_max_allocated"):
            if key in r:
                r[f"{key}_ratio"] = r[key] / rows["bp"][key]
    return {"model": model_name, "blocks": blocks, "aux_depth": aux_depth, "pyramid": pyramid, "size": size,
            "batch": batch, "device": device, "rules": rows}


def _print_activations(res: dict) -> None:
    print(f"activations: {res['model']} K={res['blocks']} d={res['aux_depth']} tau={res['pyramid']} "
          f"batch {res['batch']} at {res['size']}px on {res['device']}")
    for label, r in res["rules"].items():
        line = (f"  {label:16s} activations {r['activations'] / 2**20:8.1f} MiB  x{r['activations_ratio']:.3f}   "
                f"with weights x{r['with_weights_ratio']:.3f}")
        if "estimate" in r:
            line += f"   planner's estimate {r['estimate'] / 2**20:.1f} MiB"
        if "cuda_max_allocated_ratio" in r:
            line += f"   cuda max allocated x{r['cuda_max_allocated_ratio']:.3f}"
        print(line)


# -- part "total" ----------------------------------------------------------------------------------
def _rss() -> int:
    return peak_rss_bytes()  # this process's own peak (ru_maxrss would include the parent's, see memory.py)


def _child(model_name: str, blocks: int, size: int, batch: int, label: str, device: str, threads: int,
           aux_depth: int = 2, pyramid: float = 0.5, reference_dir: str | None = None) -> dict:
    torch.set_num_threads(threads)
    rule, per_unit, options = TOTAL_ROWS[label]
    base = _rss()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if rule == "reference":  # theirs alone: our model is not built (its weights would count in the RSS)
            net = reference_peer.build_reference(reference_dir, model_name, blocks, aux_depth, pyramid, batch,
                                                 size=size).to(device).train()
        elif rule in END_TO_END:
            model = create_model(model_name, num_classes=10)
            net = END_TO_END[rule](model, blocks, size, batch)
            if net is None:
                return {"skipped": f"{type(model).__name__} has no set_grad_checkpointing"}
            net = net.to(device).train()
        else:
            net = to_auglocal(create_model(model_name, num_classes=10), blocks=blocks, rule=rule,
                              aux_depth=aux_depth, pyramid=pyramid, input_size=(3, size, size), batch=batch,
                              **options).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*net.parameters(), *net.buffers(), x, y)}
    resident = sum(storages.values())

    def steps():
        for _ in range(2):
            if rule == "reference":  # as their train.py: zero_grad, forward (every backward inside), step
                reference_peer.step(net, opt, x, y)
                continue
            if rule in END_TO_END:  # one loss, one backward through the checkpointed blocks
                torch.nn.functional.cross_entropy(net(x), y).backward()
            else:
                net.training_step(x, y, optimizer=opt if per_unit else None)
            opt.step()
            opt.zero_grad(set_to_none=True)

    allocated = resident + allocated_peak(steps, device)
    rss = _rss()  # before the timm row builds a plan for bp's estimate
    plan = getattr(net, "plan", None)
    if plan is None:  # timm's own checkpointing, theirs: no plan, so no estimate (the bp row's plan gives bp's)
        plan = to_auglocal(create_model(model_name, num_classes=10), rule="bp", input_size=(3, size, size),
                           batch=batch).plan
        est = None
    elif rule == "checkpointed":
        est = checkpointed_footprint(plan, batch)
    else:
        est = estimate_footprint(plan, batch, per_unit_steps=per_unit)
    return {"allocated": allocated, "rss": rss, "base": base, "estimate": est.to_dict() if est else None,
            "bp_estimate": bp_footprint(plan, batch).total,
            "crossover": crossover_batch(net.plan) if rule == "auglocal" and per_unit and not options else None}


def _checkpointed(model, blocks: int, size: int, batch: int):
    return checkpointed(model, blocks=blocks, input_size=(3, size, size), batch=batch)


def _timm_checkpointing(model, blocks: int, size: int, batch: int):
    if not hasattr(model, "set_grad_checkpointing"):
        return None  # the family has none: the row is left out
    model.set_grad_checkpointing(True)
    return model


# end-to-end rows: rule name -> how the model is prepared (a module trained with one loss)
END_TO_END = {"checkpointed": _checkpointed, "timm-checkpointing": _timm_checkpointing}


def run_total(model: str, blocks: int, size: int, batch: int, label: str, device: str, threads: int,
              aux_depth: int = 2, pyramid: float = 0.5, reference_dir: str | None = None) -> dict:
    """One row in a fresh interpreter (this file with ``--child``): no run's peak or allocator state
    leaks into another's."""
    spec = json.dumps([model, blocks, size, batch, label, device, threads, aux_depth, pyramid, reference_dir])
    out = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measuring {label} at batch {batch} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_total(model: str, blocks: int, size: int, batch: int, labels, device: str, threads: int,
                  aux_depth: int = 2, pyramid: float = 0.5, reference_dir: str | None = None) -> dict:
    rows = {label: run_total(model, blocks, size, batch, label, device, threads, aux_depth, pyramid, reference_dir)
            for label in labels}
    rows = {label: r for label, r in rows.items() if "skipped" not in r}
    bp = rows.get("bp")
    for r in rows.values():
        if bp:
            r["allocated_ratio"] = r["allocated"] / bp["allocated"]
            r["rss_ratio"] = r["rss"] / bp["rss"]
        if r["estimate"]:
            r["estimate_ratio"] = r["estimate"]["total"] / r["bp_estimate"]
    crossover = next((r["crossover"] for r in rows.values() if r["crossover"] is not None), None)
    return {"model": model, "blocks": blocks, "aux_depth": aux_depth, "pyramid": pyramid, "size": size,
            "batch": batch, "device": device, "rows": rows, "crossover": crossover}


def _print_total(res: dict) -> None:
    rows = res["rows"]
    base = next(iter(rows.values()))["base"]
    print(f"total: {res['model']} K={res['blocks']} d={res['aux_depth']} tau={res['pyramid']} {res['size']}px "
          f"batch {res['batch']} on {res['device']} (MiB; peak RSS of the imports alone: {base / 2**20:.0f})")
    width = max(38, *map(len, rows))
    for label, r in rows.items():
        e = r["estimate"]
        est = (f"   estimate {e['total'] / 2**20:6.0f} x{r['estimate_ratio']:.2f} (weights {e['weights'] / 2**20:.0f}, "
               f"gradients {e['gradients'] / 2**20:.0f}, optimizer {e['optimizer'] / 2**20:.0f}, "
               f"activations {e['activations'] / 2**20:.0f})" if e else "   estimate -")
        print(f"  {label:{width}s} allocated {r['allocated'] / 2**20:6.0f}{_ratio(r, 'allocated_ratio')}"
              f"   peak RSS {r['rss'] / 2**20:6.0f}{_ratio(r, 'rss_ratio')}{est}")
    if res["crossover"]:
        print(f"  crossover (estimate): auglocal's total falls below bp's from batch {res['crossover']}")


def _ratio(row: dict, key: str) -> str:
    return f" x{row[key]:.2f}" if key in row else ""  # no bp row measured: no ratio


def _check_reference(args, settings) -> list[str]:
    """Part total's rows, with the reference rows added when ``--reference-dir`` is given; a one-line
    refusal, before any child starts, of a directory or setting their code cannot take."""
    rows = list(args.rows)
    if not args.reference_dir:
        if REFERENCE in rows:
            raise AugLocalError(f"--rows {REFERENCE!r} needs --reference-dir DIR, a checkout of {reference_peer.REPO}")
        return rows
    for model, k, size, _ in settings:
        reference_peer.check_config(model, k, args.aux_depth, args.pyramid, size)
    reference_peer.load_reference(args.reference_dir)
    return rows + [r for r in REFERENCE_ROWS if r not in rows]


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv))


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("activations", "total", "both"), default="both")
    p.add_argument("--model", help="one model instead of the default settings")
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--aux-depth", type=int, default=2, help="aux net depth d (both parts)")
    p.add_argument("--pyramid", type=float, default=0.5, help="pyramid coefficient tau (both parts)")
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rows", nargs="+", choices=list(TOTAL_ROWS), metavar="ROW",
                   default=[r for r in TOTAL_ROWS if r not in REFERENCE_ROWS],
                   help=f"part total: which rows ({', '.join(TOTAL_ROWS)})")
    p.add_argument("--reference-dir", metavar="DIR", help="part total: also measure the paper authors' "
                   "LocalResNet from a checkout of ChenxiangMA/AugLocal at DIR, and ours with their split")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="part total: torch threads per process")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one row of part total, in the process run_total starts
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*json.loads(args.child))))
        return 0
    out: dict = {"machine": platform.machine(), "torch": torch.__version__}
    if args.part in ("activations", "both"):
        settings = ([(args.model, args.blocks, args.aux_depth, args.size, b) for b in args.batch]
                    if args.model else SETTINGS)
        out["settings"] = []
        for model, k, d, size, batch in settings:
            out["settings"].append(measure(model, k, d, size, batch, args.pyramid, args.device))
            if not args.json:
                _print_activations(out["settings"][-1])
    if args.part in ("total", "both"):
        settings = [(args.model, args.blocks, args.size, tuple(args.batch))] if args.model else TOTAL_SETTINGS
        rows = _check_reference(args, settings)
        out["total"] = []
        for model, k, size, batches in settings:
            for batch in batches:
                out["total"].append(measure_total(model, k, size, batch, rows, args.device, args.threads,
                                                  args.aux_depth, args.pyramid, args.reference_dir))
                if not args.json:
                    _print_total(out["total"][-1])
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
