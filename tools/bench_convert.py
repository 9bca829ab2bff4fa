"""Conversion time: ``to_auglocal`` against a bare torch.fx trace of the same model, as ratios.

    python tools/bench_convert.py [--models resnet50 vit_base_patch16_224 ...] [--blocks 16] [--frontend export] [--json]

All are timed on the same freshly created model, median over ``--repeats``; the trace is the
tracer ``to_auglocal`` itself uses (``--frontend``: torch.fx with timm's not-traced leaves, or
torch.export, whose trace includes grouping its operators back into the model's modules). ``plan`` is ``build_plan``: trace,
profile (on fake tensors), cut points, layers, the axes of every crossing tensor (``axes``: timed
alone too), partition and aux recipes. ``to_auglocal`` adds the
train-mode trace, splitting, and building the aux nets, whose fresh weights are real memory:
``init floor`` is the time to merely allocate and randomly fill that many float32 parameters
(``torch.empty(n).uniform_()``), a lower bound for any conversion that builds them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auglocal_fx import build_plan, to_auglocal  # noqa: E402
from auglocal_fx.models import create_model  # noqa: E402
from auglocal_fx.passes.axes import measure_axes  # noqa: E402
from auglocal_fx.passes.frontend import trace_with  # noqa: E402
from auglocal_fx.planner import analyze_model  # noqa: E402

MODELS = ("resnet50", "vit_base_patch16_224", "convnext_tiny", "efficientnet_b0")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, blocks: int, repeats: int, frontend: str = "fx") -> dict:
    torch.manual_seed(0)
    model = create_model(name).eval()
    layers = len(to_auglocal(model, 1, frontend=frontend).plan.layers)  # also warms caches for every timing
    k = min(blocks, layers)
    aux_params = sum(p.numel() for p in to_auglocal(model, k, frontend=frontend).aux_parameters())
    a = analyze_model(model, frontend=frontend)  # the axes pass alone (issue 25): a second fake run, the graph reading
    example = torch.randn(1, *a.input_size)
    trace_s = _median_time(lambda: trace_with(model, frontend, (example,)), repeats)
    plan_s = _median_time(lambda: build_plan(model, k, frontend=frontend), repeats)
    nodes = [n for n in a.gm.graph.nodes if n.name in a.axes.layouts or n.op == "placeholder"]
    axes_s = _median_time(lambda: measure_axes(a.gm, example, nodes), repeats)
    convert_s = _median_time(lambda: to_auglocal(model, k, frontend=frontend), repeats)
    floor_s = _median_time(lambda: torch.empty(aux_params).uniform_(), repeats)
    return {"model": name, "frontend": frontend, "layers": layers, "blocks": k, "trace_s": trace_s, "plan_s": plan_s, "axes_s": axes_s,
            "convert_s": convert_s, "aux_params": aux_params, "init_floor_s": floor_s,
            "plan_ratio": plan_s / trace_s, "ratio": convert_s / trace_s, "floor_ratio": floor_s / trace_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--blocks", type=int, default=16, help="K = min(BLOCKS, layers) (default 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--frontend", choices=("fx", "export"), default="fx", help="the tracer (default fx)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    rows = [measure(m, args.blocks, args.repeats, args.frontend) for m in args.models]
    res = {"threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
           "repeats": args.repeats, "models": rows}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"median of {args.repeats}, {res['threads']} threads; ratios to the bare {args.frontend} trace")
    for r in rows:
        print(f"  {r['model']:24s} K={r['blocks']:2d}  trace {1000 * r['trace_s']:6.1f} ms   "
              f"plan {1000 * r['plan_s']:7.1f} ms x{r['plan_ratio']:.1f} (axes {1000 * r['axes_s']:6.1f} ms)   "
              f"to_auglocal {1000 * r['convert_s']:7.1f} ms x{r['ratio']:.1f}   "
              f"init floor of {r['aux_params'] / 1e6:.1f}M aux params {1000 * r['init_floor_s']:6.1f} ms "
              f"x{r['floor_ratio']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
