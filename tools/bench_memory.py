"""Peak activation memory of one training step: bp vs dgl vs auglocal, as ratios to bp.

    python tools/bench_memory.py [--json]          # the issue's three settings, below
    python tools/bench_memory.py --model resnet50 --blocks 16 --aux-depth 2 --batch 8 --size 224

Default settings: timm resnet50 (K=16, d=2, tau=0.5, 224 px, batch 8), CIFAR ResNet-32 (K=16, d=2,
32 px, batch 128) and ResNet-110 (K=55, d=3, batch 128), the paper's splits. Rows: bp, dgl, and
auglocal partitioned by equal layer counts (the paper's ``balance=layers``) and by activation
memory (``balance=memory``: the largest block + aux net, estimated from the profile, is minimised).

"activations" are the bytes autograd saves for backward, alive at once, deduplicated by storage,
with the network's parameters left out (a conv saves its weight, but weights are resident under
every rule); "with weights" counts them too. For auglocal, ``estimate`` is what the planner
predicts for the step's peak (``unit_act_bytes`` x batch), which the memory balancer minimises.
On a GPU the tool also reports ``torch.cuda.max_memory_allocated`` over the step (weights, grads
and workspace included).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auglocal_fx import to_auglocal  # noqa: E402
from auglocal_fx.memory import SavedTensorMeter  # noqa: E402
from auglocal_fx.models import create_model  # noqa: E402
from auglocal_fx.partition import unit_act_bytes  # noqa: E402
from auglocal_fx.rules import get_rule  # noqa: E402

SETTINGS = (  # model, K, d, size, batch
    ("resnet50", 16, 2, 224, 8),
    ("resnet32_cifar", 16, 2, 32, 128),
    ("resnet110_cifar", 55, 3, 32, 128),
)
VARIANTS = (("bp", "bp", "layers"), ("dgl", "dgl", "layers"), ("auglocal", "auglocal", "layers"),
            ("auglocal/memory", "auglocal", "memory"))


def measure(model_name: str, blocks: int, aux_depth: int, size: int, batch: int, pyramid: float = 0.5,
            device: str = "cpu") -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    rows = {}
    for label, rule, balance in VARIANTS:
        net = to_auglocal(model, blocks=blocks, rule=rule, aux_depth=aux_depth, pyramid=pyramid,
                          balance=balance, input_size=(3, size, size)).to(device).train()
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


def _print(res: dict) -> None:
    print(f"{res['model']} K={res['blocks']} d={res['aux_depth']} tau={res['pyramid']} batch {res['batch']} "
          f"at {res['size']}px on {res['device']}")
    for label, r in res["rules"].items():
        line = (f"  {label:16s} activations {r['activations'] / 2**20:8.1f} MiB  x{r['activations_ratio']:.3f}   "
                f"with weights x{r['with_weights_ratio']:.3f}")
        if "estimate" in r:
            line += f"   planner's estimate {r['estimate'] / 2**20:.1f} MiB"
        if "cuda_max_allocated_ratio" in r:
            line += f"   cuda max allocated x{r['cuda_max_allocated_ratio']:.3f}"
        print(line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="one model instead of the default three settings")
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--aux-depth", type=int, default=2)
    p.add_argument("--pyramid", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    settings = [(args.model, args.blocks, args.aux_depth, args.size, args.batch)] if args.model else SETTINGS
    results = []
    for model, k, d, size, batch in settings:
        results.append(measure(model, k, d, size, batch, args.pyramid, args.device))
        if not args.json:
            _print(results[-1])
    if args.json:
        print(json.dumps({"machine": platform.machine(), "torch": torch.__version__, "settings": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
