"""``auglocal-train``: train a converted model from a YAML recipe (AugLocal, or the BP / DGL baselines)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..errors import AugLocalError
from ..training import load_recipe, train
from ..training.run_folder import check_run_folder
from .common import run_cli

PROG = "auglocal-train"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a timm model with supervised local learning from a YAML recipe. Under "
                    "torchrun (torchrun --nproc_per_node N -m auglocal_fx.cli.train ...) it trains "
                    "data-parallel, or in pipeline stages of blocks with --set parallel.pipeline=P.")
    p.add_argument("recipe", help="recipe file, e.g. recipes/fashion_mnist_auglocal.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set epochs=1 --set optimizer.lr=0.05 (repeatable)")
    p.add_argument("--resume", metavar="PATH",
                   help="continue from a checkpoint (last.pt); 'auto': the output folder's last.pt if any")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop after this epoch, keeping the full run's schedule (continue with --resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run the output folder holds (its checkpoints, metrics, plot); without it "
                        "such a folder is refused unless --resume continues it")
    p.add_argument("--print-recipe", action="store_true", help="print the validated recipe and exit")
    return p


def _main(argv=None) -> int:
    args = parser().parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    if args.stop_after is not None and args.stop_after < 1:
        raise AugLocalError(f"--stop-after must be at least 1, got {args.stop_after}")
    resume = args.resume
    if resume == "auto":
        last = Path(recipe.output) / "last.pt"
        resume = str(last) if last.is_file() else None
    if resume is not None and args.overwrite:
        raise AugLocalError("--resume continues the run in the output folder and --overwrite replaces it; "
                            "pass one of them")
    check_run_folder(recipe.output, resume, args.overwrite, words="cli", source=args.recipe)  # train() checks too, in Python's words
    s = train(recipe, resume=resume, stop_after=args.stop_after, overwrite=args.overwrite)
    if s is None:  # not rank 0 under torchrun: rank 0 reports
        return 0
    if s["test_acc"] is None:
        print(f"nothing to do: {s['output']} already holds {s['epochs_done']} of {s['epochs']} epochs")
        return 0
    print(f"test accuracy {100 * s['test_acc']:.2f}% after {s['epochs_done']}/{s['epochs']} epochs "
          f"(best {100 * s['best_test_acc']:.2f}% at epoch {s['best_epoch']}); "
          f"{s['model']} {s['rule']} with {s['blocks']} block{'s' if s['blocks'] != 1 else ''}")
    print(f"wrote {s['output']}/last.pt, metrics.jsonl, curves.png, summary.json")
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
