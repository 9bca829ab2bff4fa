"""How finely the compiler splits models: layers found vs the repeated blocks of the module tree.

    python tools/granularity.py poolformerv2_s12 pit_s_224 densenet121 [--max-bundle 8] [--json]

Per model, at its default input size: L, the layers found; U, the repeated blocks of its module
tree (``auglocal_fx.passes.module_groups.repeated_blocks``); the most tensors one layer boundary hands on; and,
when L < U, why (the first boundary without a cut). Trace and profile only: no weights trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auglocal_fx.cli.common import run_cli  # noqa: E402
from auglocal_fx.models import create_model  # noqa: E402
from auglocal_fx.passes.cuts import MAX_BUNDLE  # noqa: E402
from auglocal_fx.passes.module_groups import repeated_blocks  # noqa: E402
from auglocal_fx.planner import analyze_model  # noqa: E402

PROG = "granularity"


def measure(name: str, max_bundle: int = MAX_BUNDLE) -> dict:
    model = create_model(name)
    a = analyze_model(model, max_bundle=max_bundle)
    units = repeated_blocks(model)
    return {"model": name, "layers": len(a.layers), "repeated_blocks": units, "widest_cut": a.widest_cut,
            "why": a.notes[0] if len(a.layers) < units and a.notes else ""}


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="timm model names")
    p.add_argument("--max-bundle", type=int, default=MAX_BUNDLE, help=f"as auglocal-convert (default {MAX_BUNDLE})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # model constructors' deprecation chatter
    rows = [measure(name, args.max_bundle) for name in args.models]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'model':32} {'L':>3} {'U':>3} {'cut':>3}  why L < U")
    for r in rows:
        print(f"{r['model'][:32]:32} {r['layers']:>3} {r['repeated_blocks']:>3} {r['widest_cut']:>3}  {r['why'][:120]}")
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
