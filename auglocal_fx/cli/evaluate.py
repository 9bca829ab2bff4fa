"""``auglocal-eval``: a trained checkpoint on a dataset: the final head's accuracy and loss and every
aux head's accuracy, printed and, with ``--out``, written as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from ..atomic import atomic_write_text, check_output_path
from ..training.evaluation import evaluate_checkpoint
from .common import run_cli

PROG = "auglocal-eval"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a checkpoint written by auglocal-train (best.pt, last.pt, epoch-NNNN.pt) on its "
                    "recipe's test or validation split, or on other data (--set data.dataset=...).")
    p.add_argument("checkpoint", help="a file from auglocal-train, e.g. runs/x/best.pt")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split of the data (default test)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a key of the run's recipe, e.g. --set data.dataset=fashion_mnist --set "
                        "data.test_limit=1000 (repeatable)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the recipe's")
    p.add_argument("--out", metavar="JSON", help="also write the figures here")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    return p


def _main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.out:
        check_output_path(args.out, [args.checkpoint], "--out", args.overwrite)
    r = evaluate_checkpoint(args.checkpoint, args.split, args.overrides, args.device)
    aux = f"; aux heads {' '.join(f'{100 * a:.1f}' for a in r['aux_acc'])}" if r["aux_acc"] else ""
    print(f"{r['checkpoint']} (epoch {r['epoch']}, {r['weights']} weights) on {r['dataset']} {r['split']}, "
          f"{r['images']} images: accuracy {100 * r['acc']:.2f}%, loss {r['loss']:.4f}{aux}")
    if args.out:
        atomic_write_text(args.out, json.dumps(r, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv), parser())


if __name__ == "__main__":
    sys.exit(main())
