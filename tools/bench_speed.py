"""Median training-step time of bp, dgl and auglocal in one process, interleaved, as ratios to bp.

    python tools/bench_speed.py --model resnet50 --blocks 16 --batch 8 --size 224 [--json]
    python tools/bench_speed.py --model resnet32_cifar --blocks 16 --batch 128 --size 32

One step is ``training_step`` (every block's forward and backward) plus the SGD update. The rules
share one batch and the same thread count, and their steps alternate (bp, dgl, auglocal, bp, ...)
so that machine noise hits all three alike; the figure is the median over ``--steps``.

``flops x`` is the ratio the FLOP counts predict: (backbone + aux nets) / backbone forward FLOPs
from the plan (backward costs about twice the forward for both, so the ratio carries over). Where
time follows FLOPs (a CPU), the measured ratio lands near it. ``--profile`` runs one more step per
rule under torch.profiler and splits it into block forward, aux net (or head) forward, backward
and optimizer step, from the labels ``training_step`` sets.
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

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop chatter on stderr

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import auglocal_fx  # noqa: E402,F401  (registers the CIFAR ResNets)
from auglocal_fx import to_auglocal  # noqa: E402
from auglocal_fx.models import create_model  # noqa: E402

RULES = ("bp", "dgl", "auglocal")
PHASES = {"auglocal.block": "block forward", "auglocal.top": "aux/head forward",
          "auglocal.backward": "backward", "bench.optimizer": "optimizer"}


def _step(net, opt, x, y) -> None:
    net.training_step(x, y)
    with record_function("bench.optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def forward_flops(net) -> tuple[int, int]:
    """(backbone, aux nets) forward FLOPs per sample, from the plan's profile."""
    plan = net.plan
    return sum(x.flops for x in plan.layers) + plan.head.flops, sum(a.flops for a in plan.aux)


def profile_phases(net, opt, x, y) -> dict[str, float]:
    """Seconds per labelled phase of one step (torch.profiler, CPU time of the labelled ranges)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(net, opt, x, y)
    totals = {label: 0.0 for label in PHASES.values()}
    for event in prof.events():
        if event.name in PHASES:
            totals[PHASES[event.name]] += event.time_range.elapsed_us() / 1e6
    return totals


def measure(model_name: str, blocks: int, batch: int, size: int, steps: int, warmup: int,
            aux_depth: int = 2, pyramid: float = 0.5, device: str = "cpu", channels_last: bool = False,
            profile_steps: bool = False) -> dict:
    torch.manual_seed(0)
    base = create_model(model_name, num_classes=10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    nets, opts = {}, {}
    for rule in RULES:
        net = to_auglocal(copy.deepcopy(base), blocks, rule=rule, aux_depth=aux_depth, pyramid=pyramid,
                          input_size=(3, size, size)).to(device, memory_format=fmt).train()
        nets[rule], opts[rule] = net, torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    times: dict[str, list[float]] = {r: [] for r in RULES}
    for i in range(warmup + steps):
        for rule in RULES:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _step(nets[rule], opts[rule], x, y)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[rule].append(time.perf_counter() - start)
    med = {r: statistics.median(t) for r, t in times.items()}
    rows = {}
    for r in RULES:
        backbone, aux = forward_flops(nets[r])
        rows[r] = {"median_step_s": med[r], "ratio_to_bp": med[r] / med["bp"], "blocks": len(nets[r].blocks),
                   "backbone_gflops": backbone / 1e9, "aux_gflops": aux / 1e9, "flops_ratio": (backbone + aux) / backbone}
        if profile_steps:
            rows[r]["phases_s"] = profile_phases(nets[r], opts[r], x, y)
    return {"model": model_name, "blocks": blocks, "aux_depth": aux_depth, "pyramid": pyramid, "batch": batch,
            "size": size, "steps": steps, "threads": torch.get_num_threads(), "device": device,
            "channels_last": channels_last, "machine": platform.machine(), "torch": torch.__version__,
            "rules": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    res = measure(args.model, args.blocks, args.batch, args.size, args.steps, args.warmup, args.aux_depth,
                  args.pyramid, args.device, args.channels_last, args.profile)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['model']} K={res['blocks']} d={res['aux_depth']} batch {res['batch']} at {res['size']}px on "
          f"{res['device']}{' channels-last' if res['channels_last'] else ''}, {res['threads']} threads, "
          f"median of {res['steps']} interleaved steps")
    for rule, r in res["rules"].items():
        line = (f"  {rule:9s} {1000 * r['median_step_s']:9.1f} ms/step  x{r['ratio_to_bp']:.2f} of bp   "
                f"flops x{r['flops_ratio']:.2f} (backbone {r['backbone_gflops']:.2f} + aux {r['aux_gflops']:.2f} "
                f"GFLOPs/sample)")
        print(line)
        if "phases_s" in r:
            total = sum(r["phases_s"].values()) or 1.0
            print("            " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in r["phases_s"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
