"""A model (not a measurement) of training throughput on P GPUs: local-learning pipeline stages vs
1F1B pipelined backprop vs data parallelism, from the plans' FLOPs and boundary sizes.

    python tools/pipeline_model.py              # resnet50 K=16, vit_base K=12; auglocal and dgl; P = 4, 8, 16
    python tools/pipeline_model.py --tflops 200 --link-gbs 100 --batch 256 [--json]

Assumptions, all stated in the output: time is proportional to FLOPs at ``--tflops`` sustained per
GPU (backward = 2x forward); links carry ``--link-gbs`` GB/s per GPU in each direction; every
transfer overlaps compute (a step takes the larger of the two), which favours every scheme alike.

- local pipeline (``parallel.pipeline: P``): the K units split into P stages by FLOPs
  (``stages.assign_stages``); a step of ``--batch`` images takes the slowest stage's forward +
  backward of its blocks and aux nets; forward only, the boundary activations (float32) and labels.
- 1F1B backprop: the backbone's layers split into P stages by FLOPs, ``--microbatches`` m (default
  4P): a step takes (m + P - 1) / m x the slowest stage (the bubble); activations go forward and
  their gradients back (twice the boundary bytes).
- DDP: each GPU runs backprop on batch / P, then all-reduces the gradients (2 (P-1)/P x the
  parameter bytes, ring).

Speed-ups are images/s over backprop on one GPU at the same batch. They leave out what a real run
adds: kernel efficiency at small per-GPU batches (hurts DDP and 1F1B microbatches), optimizer time,
stragglers. Local learning also computes its aux nets (the ``aux FLOPs`` column), a cost backprop
does not pay, and trains to a slightly different accuracy (BENCHMARKS.md, accuracy study).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auglocal_fx import to_auglocal  # noqa: E402
from auglocal_fx.cli.common import run_cli  # noqa: E402
from auglocal_fx.costs import BACKWARD_FACTOR, unit_costs  # noqa: E402
from auglocal_fx.errors import AugLocalError  # noqa: E402
from auglocal_fx.models import create_model  # noqa: E402
from auglocal_fx.passes.partition import min_max_partition  # noqa: E402
from auglocal_fx.stages import assign_stages  # noqa: E402

PROG = "pipeline_model"
MODELS = ("resnet50:16", "vit_base_patch16_224:12")  # name:K, each at its default input size
TRAIN = 1 + BACKWARD_FACTOR


def _plan(name: str, blocks: int, rule: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_auglocal(create_model(name), blocks, rule=rule).plan


def _boundary_bytes(plan, layer: int) -> int:
    return sum(4 * int(torch.Size(t).numel()) for t in plan.layers[layer].bundle)


def model_rows(plan, ps: list[int], batch: int, tflops: float, link: float, micro: int | None) -> list[dict]:
    flops_per_s, bytes_per_s = tflops * 1e12, link * 1e9
    layer_flops = [x.flops for x in plan.layers]
    bp = TRAIN * (sum(layer_flops) + plan.head.flops)  # per sample, one GPU
    t_bp1 = bp * batch / flops_per_s
    params = sum(x.params for x in plan.layers) + plan.head.params
    local_total = sum(unit_costs(plan))
    rows = []
    for p in ps:
        if p > len(plan.blocks):
            continue
        sp = assign_stages(plan, p, "cost")
        send = max(sp.sent) * batch  # the busiest link, bytes per step
        t_local = max(max(sp.costs) * batch / flops_per_s, send / bytes_per_s)
        # 1F1B backprop over the backbone's layers (head with the last)
        costs = [TRAIN * f for f in layer_flops]
        costs[-1] += TRAIN * plan.head.flops
        groups = min_max_partition(costs, p)
        slowest = max(sum(costs[i] for i in g) for g in groups)
        m = micro or 4 * p
        b_bytes = max(_boundary_bytes(plan, g[-1]) for g in groups[:-1]) * batch
        t_1f1b = max((m + p - 1) / m * slowest * batch / flops_per_s, 2 * b_bytes / bytes_per_s)
        ring = 2 * (p - 1) / p * 4 * params
        t_ddp = max(bp * batch / p / flops_per_s, ring / bytes_per_s)
        rows.append({"stages": p, "local_pipeline_speedup": t_bp1 / t_local, "local_imbalance": sp.imbalance,
                     "local_send_mb": sum(sp.sent) * batch / 1e6,
                     "onef1b_speedup": t_bp1 / t_1f1b, "onef1b_microbatches": m,
                     "onef1b_send_mb": 2 * sum(_boundary_bytes(plan, g[-1]) for g in groups[:-1]) * batch / 1e6,
                     "ddp_speedup": t_bp1 / t_ddp, "ddp_allreduce_mb": ring / 1e6,
                     "local_one_gpu_speedup": bp / local_total})
    return rows


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME:K",
                    help="timm models and their blocks, e.g. resnet50:16 (default: resnet50:16 vit_base_patch16_224:12)")
    ap.add_argument("--stages", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--batch", type=int, default=256, help="images per training step (default 256)")
    ap.add_argument("--tflops", type=float, default=200.0, help="sustained TFLOP/s per GPU (default 200)")
    ap.add_argument("--link-gbs", type=float, default=100.0, help="GB/s per GPU and direction (default 100)")
    ap.add_argument("--microbatches", type=int, help="1F1B microbatches (default 4 x stages)")
    ap.add_argument("--rules", nargs="+", default=["auglocal", "dgl"], help="local rules to model (aux-net costs differ)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if min(args.stages) < 2:
        raise AugLocalError(f"--stages {' '.join(map(str, args.stages))}: a pipeline has at least 2 stages")
    res = {"assumptions": {"batch": args.batch, "tflops": args.tflops, "link_gbs": args.link_gbs,
                           "microbatches": args.microbatches or "4 x stages"}, "models": []}
    for entry in args.models:
        name, _, k = entry.partition(":")
        if not k.isdigit():
            raise AugLocalError(f"--models {entry}: give NAME:K, e.g. resnet50:16")
        k = int(k)
        for rule in args.rules:
            print(f"== {name} K={k} {rule}", file=sys.stderr, flush=True)
            plan = _plan(name, k, rule)
            res["models"].append({"model": name, "blocks": k, "rule": rule,
                                  "rows": model_rows(plan, args.stages, args.batch, args.tflops, args.link_gbs,
                                                     args.microbatches)})
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    a = res["assumptions"]
    print(f"A MODEL, not a measurement: batch {a['batch']}, {a['tflops']:g} TFLOP/s per GPU, {a['link_gbs']:g} GB/s "
          f"links, transfers overlapped; images/s over backprop on one GPU")
    print(f"{'model':32s} {'P':>3s} {'local pipe':>10s} {'imbal':>6s} {'sent MB':>8s} {'1F1B':>6s} {'sent MB':>8s} "
          f"{'DDP':>6s} {'allred MB':>9s}")
    for mdl in res["models"]:
        for r in mdl["rows"]:
            print(f"{mdl['model'] + ' K=' + str(mdl['blocks']) + ' ' + mdl['rule']:32s} {r['stages']:3d} {r['local_pipeline_speedup']:9.2f}x "
                  f"{r['local_imbalance']:6.2f} {r['local_send_mb']:8.1f} {r['onef1b_speedup']:5.2f}x "
                  f"{r['onef1b_send_mb']:8.1f} {r['ddp_speedup']:5.2f}x {r['ddp_allreduce_mb']:9.1f}")
        if mdl["rows"]:  # none where every P exceeds the blocks
            print(f"{'':32s}     local learning on one GPU: {mdl['rows'][0]['local_one_gpu_speedup']:.2f}x "
                  "(its aux nets' cost)")
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
