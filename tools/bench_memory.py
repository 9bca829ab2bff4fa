"""Peak saved-activation bytes of one training step: bp vs dgl vs auglocal, as ratios to bp.

    python tools/bench_memory.py --model resnet50 --blocks 16 --batch 8 --size 224 [--json]

Bytes are those autograd saves for backward, alive at once, deduplicated by storage
(auglocal_fx.memory.SavedTensorMeter); on a GPU also torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from auglocal_fx import to_auglocal
from auglocal_fx.memory import SavedTensorMeter
from auglocal_fx.models import create_model


def measure(model_name: str, blocks: int, batch: int, size: int, device: str) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    rows = {}
    for rule in ("bp", "dgl", "auglocal"):
        net = to_auglocal(model, blocks=blocks, rule=rule, input_size=(3, size, size)).to(device).train()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with SavedTensorMeter() as meter:
            net.training_step(x, y)
        rows[rule] = {"saved_peak_bytes": meter.peak}
        if device == "cuda":
            rows[rule]["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        net.zero_grad(set_to_none=True)
        del net
    for r in rows.values():
        r["saved_ratio_to_bp"] = r["saved_peak_bytes"] / rows["bp"]["saved_peak_bytes"]
        if "cuda_max_allocated" in r:
            r["cuda_ratio_to_bp"] = r["cuda_max_allocated"] / rows["bp"]["cuda_max_allocated"]
    return {"model": model_name, "blocks": blocks, "batch": batch, "size": size, "device": device,
            "machine": platform.machine(), "torch": torch.__version__, "rules": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    res = measure(args.model, args.blocks, args.batch, args.size, args.device)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['model']} K={res['blocks']} batch {res['batch']} at {res['size']}px on {res['device']}")
    for rule, r in res["rules"].items():
        line = f"  {rule:9s} saved activations {r['saved_peak_bytes'] / 2**20:9.1f} MiB  x{r['saved_ratio_to_bp']:.3f} of bp"
        if "cuda_ratio_to_bp" in r:
            line += f"   cuda max allocated x{r['cuda_ratio_to_bp']:.3f} of bp"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
