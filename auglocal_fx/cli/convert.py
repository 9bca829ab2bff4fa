"""``auglocal-convert``: plan the AugLocal split of a timm model and print or save it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings

import yaml
from rich.console import Console

from ..atomic import atomic_write_text, check_output_path
from ..compiler import to_auglocal
from ..costs import memory_summary
from ..errors import AugLocalError, AugLocalWarning
from ..models import create_model, default_input_size
from ..options import add_arguments, from_arguments, word_options
from ..plan import PlanConfig
from ..plan_plot import plot_plan
from ..stages import STAGE_BALANCES, assign_stages, check_stages, stage_table, stages_summary
from .common import flag_names, run_cli

PROG = "auglocal-convert"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Trace a timm model, split it into K gradient-isolated blocks and plan each "
                    "block's auxiliary network (AugLocal, ICLR 2024).")
    p.add_argument("--model", required=True, help="timm model name, e.g. resnet50")
    add_arguments(p, PlanConfig)  # every planning option, from its field (options.py)
    p.add_argument("--stages", type=int, metavar="P",
                   help="also split the blocks into P pipeline stages (auglocal-train's parallel.pipeline) and "
                        "print each stage's training FLOPs and what it sends on")
    p.add_argument("--stage-balance", choices=[b for b in STAGE_BALANCES if b != "time"], default="cost",
                   help="cost: stages of equal training FLOPs as far as the blocks allow; units: equal block counts")
    p.add_argument("--plot", metavar="PNG", help="draw per-block forward FLOPs, aux-net FLOPs and activation memory "
                                                 "(stages shaded with --stages) to this PNG file")
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (needs the network)")
    # how timm's scripts make the model
    p.add_argument("--in-chans", type=int, metavar="C", help="input channels (timm's in_chans; e.g. 1 for grey images)")
    p.add_argument("--img-size", type=int, metavar="S", help="input size S x S (timm's img_size, for ViTs and the "
                                                             "like; other models just plan at S)")
    p.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", default=[],
                   help="any other timm.create_model keyword, values as YAML (drop_path_rate=0.1 global_pool=avg)")
    p.add_argument("--checkpoint", metavar="PATH", help="load these local weights (timm's checkpoint_path: a state "
                                                        "dict or a timm/torch checkpoint file)")
    p.add_argument("--format", choices=("table", "json", "yaml"), default="table", help="stdout format")
    p.add_argument("--wide", action="store_true", help="every column of the table (tensors handed on, activations, "
                   "aux depth, adapters, each unit's weights + gradients + optimizer state); default: the ones that "
                   "fit a terminal")
    p.add_argument("--out", help="also write the plan here (.json: JSON, else YAML)")
    p.add_argument("--save", metavar="PATH", help="write the converted model (weights + plan) for auglocal-train/-export")
    p.add_argument("--overwrite", action="store_true", help="replace --out, --save or --plot files that exist "
                                                            "(default: refuse, so a trained checkpoint is not lost)")
    return p


def _model_kwargs(args) -> dict:
    """``timm.create_model`` keywords from --in-chans, --img-size, --checkpoint and --model-kwargs."""
    kwargs = {}
    for item in args.model_kwargs:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise AugLocalError(f"--model-kwargs {item!r} is not KEY=VALUE; give e.g. --model-kwargs drop_path_rate=0.1")
        try:
            kwargs[key] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            kwargs[key] = raw
    for flag, key, value in (("--in-chans", "in_chans", args.in_chans), ("--img-size", "img_size", args.img_size)):
        if value is not None:
            if value < 1:
                raise AugLocalError(f"{flag} {value} is not a size; give a positive integer")
            kwargs[key] = value
    if args.checkpoint is not None:
        if not os.path.isfile(args.checkpoint):
            raise AugLocalError(f"--checkpoint {args.checkpoint} is not a file; give the path of a weights file")
        kwargs["checkpoint_path"] = args.checkpoint
    return kwargs


def _main(argv=None) -> int:
    args = parser().parse_args(argv)
    # a mistake in the arguments costs nothing: found before the model is built, traced and printed
    err = Console(stderr=True)
    for flag, path in (("--out", args.out), ("--save", args.save), ("--plot", args.plot)):
        if path is not None:
            check_output_path(path, name=flag, overwrite=args.overwrite)
            if os.path.exists(path):
                err.print(f"replacing {path} ({flag})")
    options = from_arguments(PlanConfig, args, model=args.model)
    if args.stages is not None:
        check_stages(args.stages, args.blocks if args.blocks > 0 else args.stages, "--stages")
    kwargs = _model_kwargs(args)
    if args.input_size is None and (args.in_chans or args.img_size):
        options = dataclasses.replace(options, input_size=None)
    with err.status(f"creating {args.model}..."):
        model = create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes, **kwargs)
    if options.input_size is None and (args.in_chans or args.img_size):  # the size the model was made for
        c, h, w = default_input_size(model)
        size = args.img_size
        options = dataclasses.replace(options, input_size=[args.in_chans or c, size or h, size or w])
    with err.status(f"tracing, profiling and converting {args.model}..."), warnings.catch_warnings():
        warnings.simplefilter("ignore", AugLocalWarning)  # the plan's notes are printed below, as flags
        net = to_auglocal(model, options)
    plan = net.plan
    memory = memory_summary(plan)  # derived figures: printed and written beside the plan, not part of it
    stages = None
    if args.stages is not None:
        image = 4 * plan.config.input_size[0] * plan.config.input_size[1] * plan.config.input_size[2]
        needs_image = any(getattr(loss, "needs_image", False) for loss in net.aux_losses)
        stages = assign_stages(plan, args.stages, args.stage_balance, image if needs_image else 0, "--stages")
        memory = {**memory, "pipeline": stages_summary(plan, stages)}
    for note in plan.notes:
        print(f"{PROG}: note: {word_options(note, flag_names(parser()))}", file=sys.stderr)
    if args.format == "json":
        print(plan.to_json(memory))
    elif args.format == "yaml":
        print(plan.to_yaml(memory), end="")
    else:
        console = Console()  # the terminal's width, or COLUMNS
        console.print(plan.table(memory, wide=args.wide))
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
    return run_cli(PROG, lambda: _main(argv), parser())


if __name__ == "__main__":
    sys.exit(main())
