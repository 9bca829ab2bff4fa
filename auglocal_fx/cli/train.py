"""``auglocal-train``: train a converted model from a YAML recipe (AugLocal, or the BP / DGL baselines)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from ..errors import AugLocalError
from ..training import load_recipe, train
from ..training.preflight import preflight
from ..training.run_folder import check_run_folder
from .common import LAUNCHED, recorded_error, run_cli, torchrun_rank

PROG = "auglocal-train"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a timm model, or your own (model.factory), with supervised local learning from a "
                    "YAML recipe. With --nproc N (or under torchrun: torchrun --nproc_per_node N -m "
                    "auglocal_fx.cli.train ...) it trains data-parallel, or in pipeline stages of blocks with "
                    "--set parallel.pipeline=P.")
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
    p.add_argument("--check", action="store_true",
                   help="check the recipe as far as a run goes before its first step (the output folder, the "
                        "device, the data, the model converted) and exit, writing nothing")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train in N processes on this machine (torchrun --standalone --nproc_per_node N, started "
                        "here): an error in them is one line and exit status 2, without torchrun's report")
    return p


def _main(argv=None) -> int:
    args = parser().parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_recipe:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    if args.stop_after is not None and args.stop_after < 1:
        raise AugLocalError(f"--stop-after must be at least 1, got {args.stop_after}")
    if args.nproc is not None and args.nproc < 1:
        raise AugLocalError(f"--nproc must be at least 1, got {args.nproc}")
    resume = args.resume
    if resume == "auto":
        last = Path(recipe.output) / "last.pt"
        resume = str(last) if last.is_file() else None
    if resume is not None and args.overwrite:
        raise AugLocalError("--resume continues the run in the output folder and --overwrite replaces it; "
                            "pass one of them")
    check_run_folder(recipe.output, resume, args.overwrite, words="cli", source=args.recipe)  # train() checks too, in Python's words
    if args.check:
        run = preflight(recipe, resume, args.overwrite)
        plan = run.net.plan
        print(f"recipe OK: {recipe.model.label} as {len(plan.blocks)} {recipe.conversion.rule} blocks, "
              f"{len(run.train_loader.dataset)} training samples in {len(run.train_loader)} batches of "
              f"{recipe.batch_size}, {recipe.epochs} epoch{'s' if recipe.epochs != 1 else ''} into {recipe.output}")
        return 0
    if args.nproc is not None and args.nproc > 1:
        return _launch(args)
    s = train(recipe, resume=resume, stop_after=args.stop_after, overwrite=args.overwrite)
    if s is None:  # not rank 0 under torchrun: rank 0 reports
        return 0
    if s["test_acc"] is None and s["selected_on"] == "val" and s["best_val_acc"] is not None:
        print(f"stopped after epoch {s['epochs_done']}/{s['epochs']}: best validation accuracy "
              f"{100 * s['best_val_acc']:.2f}% at epoch {s['best_epoch']}; the test set is evaluated once the run "
              "completes (--resume auto)")
        print(f"wrote {s['output']}/last.pt, metrics.jsonl, curves.png, summary.json")
        return 0
    if s["test_acc"] is None:
        print(f"nothing to do: {s['output']} already holds {s['epochs_done']} of {s['epochs']} epochs")
        return 0
    if s["selected_on"] == "val":
        which = f"of best.pt (epoch {s['best_epoch']}, chosen on validation accuracy {100 * s['best_val_acc']:.2f}%)"
    else:
        which = f"at the last epoch (best {100 * s['best_test_acc']:.2f}% at epoch {s['best_epoch']}; no validation split)"
    print(f"test accuracy {100 * s['test_acc']:.2f}% {which} after {s['epochs_done']}/{s['epochs']} epochs; "
          f"{s['model']} {s['rule']} with {s['blocks']} block{'s' if s['blocks'] != 1 else ''}")
    print(f"wrote {s['output']}/last.pt, metrics.jsonl, curves.png, summary.json")
    return 0


# what Ctrl-C leaves: every finished epoch is in last.pt
INTERRUPTED = "; the same command with --resume auto continues from the last finished epoch"


def _launch(args) -> int:
    """Run this command in ``args.nproc`` processes, as ``torchrun --standalone`` would (torch's own
    launcher, ``torch.distributed.run``), and answer for them: a user error in any of them is one
    line (the first process's to fail; they record it, see ``common.py``) and exit status 2; any
    other failure names the process and its exit status (its traceback is in its output above)."""
    if torchrun_rank() is not None:
        raise AugLocalError("--nproc starts the processes itself; run auglocal-train --nproc N without torchrun, "
                            "or torchrun without --nproc")
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchelastic logs each failure and each process it stops (warnings, errors): reported below instead
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    worker = [args.recipe, *(a for kv in args.overrides for a in ("--set", kv))]
    if args.resume is not None:
        worker += ["--resume", args.resume]
    if args.stop_after is not None:
        worker += ["--stop-after", str(args.stop_after)]
    if args.overwrite:
        worker.append("--overwrite")
    os.environ[LAUNCHED] = "1"  # the processes inherit it: they leave the reporting to this one
    try:
        run(parse_args(["--standalone", "--nproc_per_node", str(args.nproc), "-m", "auglocal_fx.cli.train",
                        *worker]))
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
        # the first user error recorded (a process may record one and then be stopped by the launcher)
        user = next((line for _, f in failures if (line := recorded_error(PROG, f.message))), None)
        if user is not None:
            print(user, file=sys.stderr)
            return 2
        rank, first = exc.get_first_failure()
        how = (f"was stopped by signal {first.signal_name()}" if first.exitcode < 0
               else f"exited with status {first.exitcode}")
        print(f"{PROG}: the process of rank {rank} {how}; its output above says why", file=sys.stderr)
        return 1
    except SignalException:  # Ctrl-C (SIGINT) or SIGTERM: torchelastic stopped the processes
        print(f"{PROG}: interrupted{INTERRUPTED}", file=sys.stderr)
        return 130
    finally:
        os.environ.pop(LAUNCHED, None)
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv), interrupted=INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
