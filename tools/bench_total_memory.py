"""Total memory of training, as a user watches it: weights + gradients + optimizer state + activations.

    python tools/bench_total_memory.py                        # resnet50 K=16 at batch 8, 32, 128; ResNet-32 at 1024
    python tools/bench_total_memory.py --model resnet50 --blocks 16 --size 224 --batch 8 32

Per setting and rule (bp, dgl, auglocal; auglocal also without per-unit steps), a fresh process
builds the model, converts it, and runs two training steps with SGD + momentum; its peak RSS
(``getrusage``: the whole process, allocator caches and the Python runtime included) is the
measured total, reported beside the process's RSS before the model exists (imports only). Beside
it, the analytical breakdown from the plan (per sample where it scales with the batch):

- weights: backbone + aux nets, 4 bytes each;
- gradients: all of them until ``opt.step()``, or with per-unit steps the largest unit's;
- optimizer state: one momentum buffer per parameter;
- activations: bp, the backbone's saved bytes; local rules, the largest unit (block + aux net),
  the figure the memory balance minimises (``partition.unit_act_bytes``).

The crossover batch is the smallest batch at which auglocal's estimated total falls below bp's.
On a GPU (``--device cuda``) the measured figure is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = (("resnet50", 16, 224, (8, 32, 128)), ("resnet32_cifar", 16, 32, (1024,)))
RULES = (("bp", "bp", True), ("dgl", "dgl", True), ("auglocal", "auglocal", True),
         ("auglocal (one step at the end)", "auglocal", False))


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _child(model_name: str, blocks: int, size: int, batch: int, rule: str, per_unit: bool, device: str,
           threads: int) -> dict:
    import torch

    from auglocal_fx import to_auglocal
    from auglocal_fx.models import create_model

    torch.set_num_threads(threads)
    base = _rss()
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = to_auglocal(model, blocks=blocks, rule=rule, input_size=(3, size, size)).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        net.training_step(x, y, optimizer=opt if per_unit else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated() if device == "cuda" else _rss()
    return {"measured": measured, "base": base, "estimate": _estimate(net, batch, per_unit)}


def _estimate(net, batch: int, per_unit: bool) -> dict:
    from auglocal_fx.partition import unit_act_bytes

    plan = net.plan
    params = sum(p.numel() for p in net.parameters())
    units = [sum(p.numel() for p in u.parameters()) for u in net.local_units()]
    if len(net.blocks) == 1:
        acts = batch * (sum(x.act_bytes for x in plan.layers) + plan.head.act_bytes)
    else:
        acts = batch * max(unit_act_bytes(plan)) if net.options["rule"] == "auglocal" else None
    out = {"weights": 4 * params, "gradients": 4 * (max(units) if per_unit else params),
           "optimizer": 4 * params, "activations": acts}
    out["total"] = None if acts is None else sum(out.values())
    return out


def run(model: str, blocks: int, size: int, batch: int, rule: str, per_unit: bool, device: str, threads: int) -> dict:
    """One measurement in a fresh interpreter (this file with ``--child``), so no run's peak or
    allocator state leaks into another's."""
    spec = json.dumps([model, blocks, size, batch, rule, per_unit, device, threads])
    out = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measuring {rule} at batch {batch} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="one model instead of the default settings")
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one measurement, in the process run() starts
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*json.loads(args.child))))
        return 0
    settings = [(args.model, args.blocks, args.size, tuple(args.batch))] if args.model else SETTINGS
    results = []
    for model, k, size, batches in settings:
        for batch in batches:
            rows = {label: run(model, k, size, batch, rule, per_unit, args.device, args.threads)
                    for label, rule, per_unit in RULES}
            results.append({"model": model, "blocks": k, "size": size, "batch": batch, "rows": rows,
                            "crossover": None})
            if args.json:
                continue
            bp = rows["bp"]
            print(f"{model} K={k} {size}px batch {batch} ({args.device}; process before the model: "
                  f"{bp['base'] / 2**20:.0f} MiB)")
            for label, r in rows.items():
                e = r["estimate"]
                est = (f"estimate {e['total'] / 2**20:7.0f} MiB (x{e['total'] / bp['estimate']['total']:.2f}: "
                       + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in e.items() if k != "total") + ")"
                       if e["total"] is not None else "estimate -")
                own, bp_own = r["measured"] - r["base"], bp["measured"] - bp["base"]
                print(f"  {label:32s} measured {r['measured'] / 2**20:7.0f} MiB  x{r['measured'] / bp['measured']:.2f}"
                      f"  above imports {own / 2**20:6.0f} MiB  x{own / bp_own:.2f}   {est}")
        crossover = _crossover(results, model)
        for r in results:
            r["crossover"] = crossover if r["model"] == model else r["crossover"]
        if not args.json:
            print(f"  crossover (estimate): auglocal's total falls below bp's from batch {crossover}"
                  if crossover else "  crossover: none (auglocal's activations per sample are not below bp's)")
    if args.json:
        print(json.dumps({"settings": results}, indent=1))
    return 0


def _crossover(results: list[dict], model: str) -> int | None:
    """The smallest batch at which auglocal's estimated total is below bp's (from the plan's
    figures: fixed bytes + batch x per-sample bytes, for each rule); None if never."""
    r = next(x for x in results if x["model"] == model)
    a, b = r["rows"]["auglocal"]["estimate"], r["rows"]["bp"]["estimate"]

    def fixed(e):
        return e["weights"] + e["gradients"] + e["optimizer"]

    per_a, per_b = a["activations"] / r["batch"], b["activations"] / r["batch"]
    if per_a >= per_b:
        return None
    return max(1, int((fixed(a) - fixed(b)) / (per_b - per_a)) + 1)


if __name__ == "__main__":
    sys.exit(main())
