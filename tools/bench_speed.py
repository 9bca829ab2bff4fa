"""Median training-step time of bp, dgl and auglocal in one process, interleaved, as ratios to bp.

    python tools/bench_speed.py --model resnet50 --blocks 16 --batch 8 --size 224 [--json]
    python tools/bench_speed.py --model resnet32_cifar --blocks 16 --batch 128 --size 32

One step is ``training_step`` (every block's forward and backward) plus the SGD update. The rules
share one batch and the same thread count, and their steps alternate (bp, dgl, auglocal, bp, ...)
so that machine noise hits all three alike; the figure is the median over ``--steps``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import auglocal_fx  # noqa: E402,F401  (registers the CIFAR ResNets)
from auglocal_fx import to_auglocal  # noqa: E402
from auglocal_fx.models import create_model  # noqa: E402

RULES = ("bp", "dgl", "auglocal")


def measure(model_name: str, blocks: int, batch: int, size: int, steps: int, warmup: int,
            aux_depth: int = 2, pyramid: float = 0.5, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    base = create_model(model_name, num_classes=10)
    nets, opts = {}, {}
    for rule in RULES:
        net = to_auglocal(copy.deepcopy(base), blocks, rule=rule, aux_depth=aux_depth, pyramid=pyramid,
                          input_size=(3, size, size)).to(device).train()
        nets[rule], opts[rule] = net, torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    times: dict[str, list[float]] = {r: [] for r in RULES}
    for i in range(warmup + steps):
        for rule in RULES:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            nets[rule].training_step(x, y)
            opts[rule].step()
            opts[rule].zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[rule].append(time.perf_counter() - start)
    med = {r: statistics.median(t) for r, t in times.items()}
    return {"model": model_name, "blocks": blocks, "batch": batch, "size": size, "steps": steps,
            "threads": torch.get_num_threads(), "device": device, "machine": platform.machine(),
            "torch": torch.__version__,
            "rules": {r: {"median_step_s": med[r], "ratio_to_bp": med[r] / med["bp"],
                          "blocks": len(nets[r].blocks)} for r in RULES}}


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
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    res = measure(args.model, args.blocks, args.batch, args.size, args.steps, args.warmup, args.aux_depth,
                  args.pyramid, args.device)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['model']} K={res['blocks']} batch {res['batch']} at {res['size']}px on {res['device']}, "
          f"{res['threads']} threads, median of {res['steps']} interleaved steps")
    for rule, r in res["rules"].items():
        print(f"  {rule:9s} {1000 * r['median_step_s']:9.1f} ms/step  x{r['ratio_to_bp']:.2f} of bp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
