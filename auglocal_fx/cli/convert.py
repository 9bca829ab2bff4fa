"""``auglocal-convert``: plan the AugLocal split of a timm model and print or save it."""

from __future__ import annotations

import argparse
import sys
import warnings

from rich.console import Console

from ..atomic import atomic_write_text, check_output_path
from ..aux_precision import AUX_DTYPES
from ..compiler import to_auglocal
from ..cuts import MAX_BUNDLE
from ..errors import AugLocalWarning, reword
from ..footprint import memory_summary
from ..light_head import AUX_HEADS
from ..models import create_model
from ..partition import BALANCERS
from ..plan_plot import plot_plan
from ..planner import check_input_size
from ..recompute import RECOMPUTE
from ..rules import RULES
from ..selection import TAILS
from ..stages import STAGE_BALANCES, check_stages, split_stages, stage_table, stages_summary
from ..synthesize import AUX_INITS
from .common import run_cli

PROG = "auglocal-convert"
# the flag of each to_auglocal parameter, so library errors name what the user typed
FLAGS = {"blocks": "--blocks", "aux_depth": "--aux-depth", "pyramid": "--pyramid", "balance": "--balance",
         "tail": "--tail", "rule": "--rule", "aux_init": "--aux-init", "input_size": "--input-size",
         "num_classes": "--num-classes", "max_bundle": "--max-bundle", "layers": "--layers", "batch": "--batch",
         "recompute": "--recompute", "aux_dtype": "--aux-dtype",
         "aux_head": "--aux-head", "stages": "--stages"}


def _listing(registry) -> str:
    return "; ".join(f"{name}: {entry.summary}" for name, entry in registry.items())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Trace a timm model, split it into K gradient-isolated blocks and plan each "
                    "block's auxiliary network (AugLocal, ICLR 2024).")
    p.add_argument("--model", required=True, help="timm model name, e.g. resnet50")
    p.add_argument("--blocks", "-k", type=int, required=True, help="number of local blocks K")
    p.add_argument("--aux-depth", type=int, default=2, help="aux net depth d: layers copied (default 2)")
    p.add_argument("--pyramid", type=float, default=0.5, help="pyramidal depth coefficient tau in [0, 1]; 0 = off")
    p.add_argument("--balance", choices=list(BALANCERS), default="layers",
                   help=f"how layers are shared out among blocks ({_listing(BALANCERS)})")
    p.add_argument("--tail", choices=TAILS, default="exact",
                   help="exact: K blocks; reference: the paper's code, last d+1 blocks merged (M = K - d)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size (default: the model's pretrained_cfg input_size)")
    p.add_argument("--num-classes", type=int, help="classifier classes (default: the model's)")
    p.add_argument("--max-bundle", type=int, default=MAX_BUNDLE,
                   help=f"the most tensors a cut between two layers may hand on (default {MAX_BUNDLE})")
    p.add_argument("--layers", nargs="+", metavar="GLOB",
                   help="name the layers yourself: module paths as globs, e.g. --layers stem 'stages.*.blocks.*' "
                        "(default: timm's group_matcher / the module tree, refined to repeated blocks)")
    p.add_argument("--rule", choices=list(RULES), default="auglocal",
                   help=f"what trains each block ({_listing(RULES)})")
    p.add_argument("--aux-init", choices=list(AUX_INITS), default="model",
                   help=f"how aux nets' weights start ({_listing(AUX_INITS)})")
    p.add_argument("--aux-head", choices=AUX_HEADS, default="auto",
                   help="what aux nets end with: copy: the model's head; light: global pool + small MLP; auto: "
                        "light when the head holds over 25%% of the model's parameters (VGG), else copy")
    p.add_argument("--batch", type=int, default=32,
                   help="the batch size the memory estimate and --balance memory assume (default 32)")
    p.add_argument("--recompute", choices=RECOMPUTE, default="none",
                   help="lower memory: block recomputes each block's forward in its backward (one more block "
                        "forward per step); none: the method as published")
    p.add_argument("--aux-dtype", choices=list(AUX_DTYPES), default="float32",
                   help="lower memory: bfloat16 holds aux nets' weights, gradients and optimizer state in half the bytes")
    p.add_argument("--stages", type=int, metavar="P",
                   help="also split the blocks into P pipeline stages (auglocal-train's parallel.pipeline) and "
                        "print each stage's training FLOPs and what it sends on")
    p.add_argument("--stage-balance", choices=[b for b in STAGE_BALANCES if b != "time"], default="cost",
                   help="cost: stages of equal training FLOPs as far as the blocks allow; units: equal block counts")
    p.add_argument("--plot", metavar="PNG", help="draw per-block forward FLOPs, aux-net FLOPs and activation memory "
                                                 "(stages shaded with --stages) to this PNG file")
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (needs the network)")
    p.add_argument("--format", choices=("table", "json", "yaml"), default="table", help="stdout format")
    p.add_argument("--out", help="also write the plan here (.json: JSON, else YAML)")
    p.add_argument("--save", metavar="PATH", help="write the converted model (weights + plan) for auglocal-train/-export")
    return p


def _main(argv=None) -> int:
    args = parser().parse_args(argv)
    # a mistake in the arguments costs nothing: found before the model is built, traced and printed
    for flag, path in (("--out", args.out), ("--save", args.save), ("--plot", args.plot)):
        if path is not None:
            check_output_path(path, name=flag)
    if args.input_size is not None:
        check_input_size(args.input_size)
    if args.stages is not None:
        check_stages(args.stages, args.blocks if args.blocks > 0 else args.stages, "--stages")
    err = Console(stderr=True)
    with err.status(f"creating {args.model}..."):
        model = create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes)
    with err.status(f"tracing, profiling and converting {args.model}..."), warnings.catch_warnings():
        warnings.simplefilter("ignore", AugLocalWarning)  # the plan's notes are printed below, as flags
        net = to_auglocal(model, args.blocks, aux_depth=args.aux_depth, pyramid=args.pyramid,
                          balance=args.balance, tail=args.tail, aux_init=args.aux_init, rule=args.rule,
                          input_size=args.input_size, model_name=args.model, num_classes=args.num_classes,
                          max_bundle=args.max_bundle, layers=args.layers, batch=args.batch,
                          recompute=args.recompute, aux_dtype=args.aux_dtype, aux_head=args.aux_head)
    plan = net.plan
    memory = memory_summary(plan)  # derived figures: printed and written beside the plan, not part of it
    stages = None
    if args.stages is not None:
        image = 4 * plan.config.input_size[0] * plan.config.input_size[1] * plan.config.input_size[2]
        needs_image = any(getattr(loss, "needs_image", False) for loss in net.aux_losses)
        stages = split_stages(plan, args.stages, args.stage_balance, image if needs_image else 0, "--stages")
        memory = {**memory, "pipeline": stages_summary(plan, stages)}
    for note in plan.notes:
        print(f"{PROG}: note: {reword(note, FLAGS)}", file=sys.stderr)
    if args.format == "json":
        print(plan.to_json(memory))
    elif args.format == "yaml":
        print(plan.to_yaml(memory), end="")
    else:
        console = Console(width=max(Console().width, 190))
        console.print(plan.table(memory))
        if stages is not None:
            console.print(stage_table(plan, stages))
    if args.plot:
        plot_plan(plan, args.plot, stages)
        err.print(f"wrote picture to {args.plot}")
    if args.out:
        text = plan.to_json(memory) + "\n" if args.out.endswith(".json") else plan.to_yaml(memory)
        atomic_write_text(args.out, text)
        err.print(f"wrote plan to {args.out}")
    if args.save:
        net.save(args.save)
        err.print(f"wrote converted model to {args.save}")
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv), FLAGS)


if __name__ == "__main__":
    sys.exit(main())
