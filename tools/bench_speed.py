"""Median training-step time of bp, dgl and auglocal in one process, interleaved, as ratios to bp.

    python tools/bench_speed.py --model resnet50 --blocks 16 --batch 8 --size 224 [--json]
    python tools/bench_speed.py --model resnet32_cifar --blocks 16 --batch 128 --size 32
    python tools/bench_speed.py --model resnet32_cifar --blocks 8 --batch 32 --size 32 --compile --threads 2

One step is ``training_step`` (every block's forward and backward) plus the SGD update. The rules
share one batch and the same thread count, and their steps alternate (bp, dgl, auglocal, bp, ...)
so that machine noise hits all three alike; the figure is the median over ``--steps``.

``flops x`` is the ratio the FLOP counts predict: (backbone + aux nets) / backbone forward FLOPs
from the plan (backward costs about twice the forward for both, so the ratio carries over). Where
time follows FLOPs (a CPU), the measured ratio lands near it. ``--profile`` runs one more step per
rule under torch.profiler and splits it into block forward, aux net (or head) forward, backward
and optimizer step, from the labels ``training_step`` sets.

``--compile`` times bp and auglocal eagerly and after ``net.compile(backend=...)`` (every block,
aux net and head compiled), all four interleaved, and reports compiled / eager per rule; the first
compiled step (where compilation happens) is a warm-up step, its time reported apart.

``--memory-options`` adds auglocal with each option that lowers its memory (``recompute=block``,
``aux_dtype=bfloat16``, both), and what a user would pick instead of local learning: bp with
activation checkpointing at the same K block boundaries (``checkpointed.py``) and with timm's own
``set_grad_checkpointing()`` (where the family has it): what each costs in step time, beside what
``bench_memory.py`` says it saves. For checkpointing, ``flops x`` counts the second forward of
every block but the last (as a third of its forward FLOPs in the "aux" column: it has no backward).

``--reference-dir DIR`` adds the paper authors' own implementation (their ``LocalResNet`` from a
checkout of ChenxiangMA/AugLocal at DIR, ``reference_peer.py``) as the row "reference", stepped as
their ``train.py`` steps it, interleaved with the others on the same batch, device, memory format
and threads, with the same optimizer. Their code has the CIFAR ResNets only, at K = the layer
count (``--model resnet32_cifar --blocks 16 --size 32``). Their split is our ``tail="reference"``
(M = K - d modules), so with ``--reference-dir`` the auglocal rows are built with it (``--tail``
overrides); the reference row's FLOPs are counted on their model, its ratio to auglocal beside.
The row "auglocal+unit optimizers" beside them is ours as ``auglocal-train`` steps it: each unit's
own optimizer (``net.unit_optimizers``) stepped right after the unit's backward.

    python tools/bench_speed.py --model resnet32_cifar --blocks 16 --aux-depth 3 --batch 128 --size 32 --reference-dir DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

try:
    import resource  # page-fault counts; POSIX only
except ImportError:  # Windows
    resource = None

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop chatter on stderr

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # reference_peer, beside this file

import reference_peer  # noqa: E402

import auglocal_fx  # noqa: E402,F401  (registers the CIFAR ResNets)
from auglocal_fx import to_auglocal  # noqa: E402
from auglocal_fx.checkpointed import CheckpointedModel, checkpointed  # noqa: E402
from auglocal_fx.cli.common import run_cli  # noqa: E402
from auglocal_fx.models import create_model  # noqa: E402
from auglocal_fx.passes.selection import TAILS  # noqa: E402
from auglocal_fx.runtime.host_memory import keep_freed_host_memory  # noqa: E402

RULES = ("bp", "dgl", "auglocal")
COMPILE_RULES = ("bp", "auglocal")  # --compile: each eager and compiled
MEMORY_OPTIONS = {"auglocal+recompute=block": {"recompute": "block"},  # --memory-options
                  "auglocal+bf16 aux": {"aux_dtype": "bfloat16"},
                  "auglocal+recompute=block+bf16 aux": {"recompute": "block", "aux_dtype": "bfloat16"}}
CHECKPOINTING = ("bp+checkpointing", "bp+timm checkpointing")  # --memory-options: what users pick instead
REFERENCE = "reference"  # --reference-dir: the authors' LocalResNet
UNIT_OPTIMIZERS = "auglocal+unit optimizers"  # --reference-dir: each unit's own optimizer, stepped per unit
PROG = "bench_speed.py"
PHASES = {"auglocal.block": "block forward", "auglocal.top": "aux/head forward",
          "auglocal.backward": "backward", "bench.optimizer": "optimizer"}


def _step(net, opt, x, y) -> None:
    net.training_step(x, y)
    with record_function("bench.optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def _unit_step(net, opt, x, y) -> None:
    """Each unit's own optimizer stepped right after its backward (``net.unit_optimizers``)."""
    net.training_step(x, y, optimizer=opt)


def forward_flops(net) -> tuple[int, int]:
    """(backbone, aux nets) forward FLOPs per sample, from the plan's profile (checkpointing: the
    blocks it runs twice in place of aux nets; timm's: its stages, not known here, so none)."""
    plan = net.plan
    backbone = sum(x.flops for x in plan.layers) + plan.head.flops
    if isinstance(net, CheckpointedModel):  # a recomputed forward has no backward of its own: a third
        # of what an aux net's forward stands for in the ratio (forward + backward = 3x forward)
        return backbone, sum(plan.block_sum(b, "flops") for b in plan.blocks[:-1]) // 3
    return backbone, sum(a.flops for a in plan.aux) if not isinstance(net, _TimmCheckpointing) else 0


class _TimmCheckpointing(torch.nn.Module):
    """A timm model with ``set_grad_checkpointing()``, stepped as a net is (``training_step``)."""

    def __init__(self, model, plan):
        super().__init__()
        self.model, self.plan, self.blocks = model, plan, [model]
        model.set_grad_checkpointing(True)

    def training_step(self, x, y):
        F.cross_entropy(self.model(x), y).backward()


def _baseline(name: str, model, blocks: int, size: int):
    """bp with checkpointing: at the plan's K blocks, or timm's own (None where the family has none)."""
    if name == "bp+checkpointing":
        return checkpointed(model, blocks, input_size=(3, size, size))
    if not hasattr(model, "set_grad_checkpointing"):
        return None
    return _TimmCheckpointing(model, to_auglocal(copy.deepcopy(model), rule="bp", input_size=(3, size, size)).plan)


def profile_phases(net, opt, x, y) -> dict[str, float]:
    """Seconds per labelled phase of one step (torch.profiler, CPU time of the labelled ranges)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(net, opt, x, y)
    totals = {label: 0.0 for label in PHASES.values()}
    for event in prof.events():
        if event.name in PHASES:
            totals[PHASES[event.name]] += event.time_range.elapsed_us() / 1e6
    return totals


def _reference_row(net, x, y) -> dict:
    """The figures of the authors' model that plans give for ours: FLOPs, modules, parameters."""
    backbone, aux = reference_peer.forward_flops(net, x, y)
    params, aux_params = reference_peer.param_counts(net)
    return {"blocks": net.local_module_num, "backbone_gflops": backbone / 1e9, "aux_gflops": aux / 1e9,
            "flops_ratio": (backbone + aux) / backbone, "params": params, "aux_params": aux_params}


def _minor_faults() -> int:
    """The process's minor page faults so far (0 where getrusage has none)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _params(net) -> dict:
    aux = net.aux_parameters() if hasattr(net, "aux_parameters") else ()  # checkpointing rows have no aux nets
    return {"params": sum(p.numel() for p in net.parameters()), "aux_params": sum(p.numel() for p in aux)}


def measure(model_name: str, blocks: int, batch: int, size: int, steps: int, warmup: int,
            aux_depth: int = 2, pyramid: float = 0.5, device: str = "cpu", channels_last: bool = False,
            profile_steps: bool = False, compile_backend: str | None = None, memory_options: bool = False,
            reference_dir: str | None = None, tail: str = "exact") -> dict:
    """Figures per variant: a rule's name, with ``compile_backend`` also ``{rule}+compiled``, with
    ``memory_options`` also auglocal with each of ``MEMORY_OPTIONS``, with ``reference_dir`` also
    ``reference``; ``tail`` is the auglocal rows' (``reference`` matches the authors' split)."""
    if reference_dir is not None:  # a wrong directory or setting fails here, before any model is built
        reference_peer.check_config(model_name, blocks, aux_depth, pyramid, size)
        reference_peer.load_reference(reference_dir)
    torch.manual_seed(0)
    base = create_model(model_name, num_classes=10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    variants = {r: (r, False, {}) for r in (COMPILE_RULES if compile_backend else RULES)}
    if compile_backend:
        variants.update({f"{r}+compiled": (r, True, {}) for r in COMPILE_RULES})
    if memory_options:
        variants.update({name: ("auglocal", False, o) for name, o in MEMORY_OPTIONS.items()})
        variants.update({name: (name, False, {}) for name in CHECKPOINTING})
    if reference_dir is not None:
        variants[REFERENCE] = (REFERENCE, False, {})
        variants[UNIT_OPTIMIZERS] = ("auglocal", False, {})  # ours as the trainer steps it, beside theirs
    nets, opts, steppers = {}, {}, {}
    for name, (rule, compiled, options) in list(variants.items()):
        steppers[name] = _step
        if rule == REFERENCE:
            net = reference_peer.build_reference(reference_dir, model_name, blocks, aux_depth, pyramid, batch,
                                                 size=size)
            nets[name] = net.to(device, memory_format=fmt).train()
            opts[name] = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
            steppers[name] = reference_peer.step
            continue
        if rule in CHECKPOINTING:
            net = _baseline(rule, copy.deepcopy(base), blocks, size)
            if net is None:  # no timm checkpointing in this family: no row
                del variants[name]
                continue
            nets[name] = net.to(device, memory_format=fmt).train()
            opts[name] = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
            continue
        if rule == "auglocal":  # the other rules keep K blocks: the authors' tail is AugLocal's only
            options = {"tail": tail, **options}
        net = to_auglocal(copy.deepcopy(base), blocks, rule=rule, aux_depth=aux_depth, pyramid=pyramid,
                          input_size=(3, size, size), **options).to(device, memory_format=fmt).train()
        if compiled:
            net.compile(backend=compile_backend)
        nets[name], opts[name] = net, torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        if name == UNIT_OPTIMIZERS:
            opts[name] = net.unit_optimizers(torch.optim.SGD, lr=1e-3, momentum=0.9)
            steppers[name] = _unit_step
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    times: dict[str, list[float]] = {v: [] for v in variants}
    faults: dict[str, list[int]] = {v: [] for v in variants}  # minor page faults: memory mapped in anew
    first: dict[str, float] = {}
    for i in range(warmup + steps):
        for v in variants:
            if device == "cuda":
                torch.cuda.synchronize()
            start, faulted = time.perf_counter(), _minor_faults()
            steppers[v](nets[v], opts[v], x, y)
            if device == "cuda":
                torch.cuda.synchronize()
            first.setdefault(v, time.perf_counter() - start)
            if i >= warmup:
                times[v].append(time.perf_counter() - start)
                faults[v].append(_minor_faults() - faulted)
    med = {v: statistics.median(t) for v, t in times.items()}
    rows = {}
    for v, (rule, compiled, options) in variants.items():
        bp = "bp+compiled" if compiled else "bp"
        rows[v] = {"median_step_s": med[v], "ratio_to_bp": med[v] / med[bp],
                   "faults_per_step": statistics.median(faults[v])}
        if rule == REFERENCE:  # their model has no plan: counted on it; no labels for --profile
            rows[v].update(_reference_row(nets[v], x, y), ratio_to_auglocal=med[v] / med["auglocal"])
            continue
        backbone, aux = forward_flops(nets[v])
        rows[v].update({"blocks": len(nets[v].blocks), "backbone_gflops": backbone / 1e9, "aux_gflops": aux / 1e9,
                        "flops_ratio": (backbone + aux) / backbone, **_params(nets[v])})
        if options:
            rows[v]["ratio_to_auglocal"] = med[v] / med["auglocal"]
        if compiled:
            rows[v]["compiled_over_eager"] = med[v] / med[rule]
            rows[v]["first_step_s"] = first[v]  # compilation included
        if profile_steps:
            rows[v]["phases_s"] = profile_phases(nets[v], opts[v], x, y)
    return {"model": model_name, "blocks": blocks, "aux_depth": aux_depth, "pyramid": pyramid, "batch": batch,
            "size": size, "steps": steps, "threads": torch.get_num_threads(), "device": device,
            "channels_last": channels_last, "compile_backend": compile_backend, "machine": platform.machine(),
            "torch": torch.__version__, "tail": tail, "reference_dir": reference_dir, "rules": rows}


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv))


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--aux-depth", type=int, default=2)
    p.add_argument("--pyramid", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=7, help="timed steps per rule (default 7)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and input for every rule")
    p.add_argument("--profile", action="store_true", help="also split one step per rule into its phases")
    p.add_argument("--compile", action="store_true",
                   help="time bp and auglocal eager and compiled (net.compile), report compiled / eager")
    p.add_argument("--backend", default="inductor", help="torch.compile backend for --compile (default inductor)")
    p.add_argument("--memory-options", action="store_true",
                   help="also time auglocal with recompute=block, bf16 aux nets, and both")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--host-memory", choices=("keep", "release"), default="keep",
                   help="keep (as auglocal-train does by default): glibc keeps freed memory for the next step, "
                        "for every row alike; release: the C library's defaults")
    p.add_argument("--reference-dir", metavar="DIR",
                   help="also time the paper authors' LocalResNet from a checkout of ChenxiangMA/AugLocal at DIR")
    p.add_argument("--tail", choices=TAILS, help="the auglocal rows' tail (default: reference with "
                   "--reference-dir, the authors' split M = K - d; else exact, K blocks)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    tail = args.tail or ("reference" if args.reference_dir else "exact")
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = args.host_memory == "keep" and keep_freed_host_memory()
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup 1 or more: the first compiled step compiles")
    res = measure(args.model, args.blocks, args.batch, args.size, args.steps, args.warmup, args.aux_depth,
                  args.pyramid, args.device, args.channels_last, args.profile,
                  args.backend if args.compile else None, args.memory_options, args.reference_dir, tail)
    res["host_memory"] = "keep" if kept else "release"
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['model']} K={res['blocks']} d={res['aux_depth']} batch {res['batch']} at {res['size']}px on "
          f"{res['device']}{' channels-last' if res['channels_last'] else ''}, {res['threads']} threads, "
          f"median of {res['steps']} interleaved steps{', auglocal tail=' + tail if tail != 'exact' else ''}"
          f"{', compiled with ' + res['compile_backend'] if res['compile_backend'] else ''}, host memory "
          f"{res['host_memory']}")
    width = max(map(len, res["rules"]))
    for rule, r in res["rules"].items():
        bp = "bp+compiled" if rule.endswith("+compiled") else "bp"
        line = (f"  {rule:{width}s} {1000 * r['median_step_s']:9.1f} ms/step  x{r['ratio_to_bp']:.2f} of {bp}   "
                f"flops x{r['flops_ratio']:.2f} (backbone {r['backbone_gflops']:.2f} + aux {r['aux_gflops']:.2f} "
                f"GFLOPs/sample)  params {r['params'] / 1e6:.2f}M (aux {r['aux_params'] / 1e6:.2f}M)  "
                f"{r['faults_per_step']:,.0f} page faults/step")
        if "ratio_to_auglocal" in r:
            line += f"  x{r['ratio_to_auglocal']:.2f} of auglocal"
        if "compiled_over_eager" in r:
            line += f"  compiled/eager x{r['compiled_over_eager']:.2f} (first step {r['first_step_s']:.1f} s)"
        print(line)
        if "phases_s" in r:
            total = sum(r["phases_s"].values()) or 1.0
            print("            " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in r["phases_s"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
