"""``auglocal-export``: the trained backbone of a checkpoint as ONNX, checked in onnxruntime."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..atomic import check_output_path
from ..compiler import load_auglocal
from ..errors import AugLocalError
from ..export import EXPORTERS, OPSETS, check_opset, export_onnx, save_backbone_state
from ..runtime.checkpoint import read_checkpoint
from .common import run_cli

PROG = "auglocal-export"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export the backbone of a converted or trained model (aux nets stripped) to ONNX and "
                    "check it against PyTorch in onnxruntime.")
    p.add_argument("checkpoint", help="a file from auglocal-train (last.pt, best.pt) or auglocal-convert --save")
    p.add_argument("--out", required=True, help="the ONNX file to write, e.g. model.onnx")
    p.add_argument("--opset", type=int,
                   help="ONNX opset, written as asked or refused (default: 20 with the dynamo exporter, 17 with "
                        f"torchscript); dynamo writes {OPSETS['dynamo'][0]}..{OPSETS['dynamo'][1]} (below 18 only "
                        "where ONNX's version converter can lower the graph; auto then uses torchscript), "
                        f"torchscript {OPSETS['torchscript'][0]}..{OPSETS['torchscript'][1]}")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size without batch (default: the size the model was converted at)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension at 1 (default: dynamic)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="torch.onnx exporter; auto (default): dynamo, torchscript only if dynamo cannot "
                        "convert the model (docs/guide/export.md says why)")
    p.add_argument("--no-verify", action="store_true", help="skip onnx.checker and the onnxruntime comparison")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest |onnxruntime - PyTorch| accepted (default 1e-4) for a network that float32 computes "
                        "to 1e-6; it grows with PyTorch's own float32 error e (max |float32 - float64| on the check's "
                        "inputs): the limit is atol * max(1, e / 1e-6), 100 * e at the default")
    p.add_argument("--state-dict", metavar="PATH",
                   help="also write the backbone's state dict (loads strictly into timm.create_model)")
    p.add_argument("--overwrite", action="store_true", help="replace --out or --state-dict files that exist "
                                                            "(default: refuse)")
    return p


def _same_path(a: str, b: str) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(a).resolve() == Path(b).resolve()


def _check_outputs(args) -> None:
    """Before any work: no output is a folder or the checkpoint, the two outputs differ, and an
    existing output is named with what it will become (outputs are replaced, as with cp or gcc -o)."""
    if not args.atol >= 0:
        raise AugLocalError(f"--atol {args.atol} is not a number >= 0; give a tolerance such as 1e-4")
    check_opset(args.opset, args.exporter)
    check_output_path(args.out, [args.checkpoint], "--out", args.overwrite)
    if args.state_dict is not None:
        check_output_path(args.state_dict, [args.checkpoint], "--state-dict", args.overwrite)
        if _same_path(args.out, args.state_dict):
            raise AugLocalError(f"--state-dict {args.state_dict} is also --out; the state dict would overwrite "
                                "the ONNX file: give them different paths")
    onnx_file = "the ONNX export" + ("" if args.no_verify else " if it passes verification")
    for path, what in ((args.out, onnx_file), (args.state_dict, "the backbone's state dict")):
        if path is not None and os.path.exists(path):
            print(f"replacing existing {path} with {what}")


def _main(argv=None) -> int:
    args = parser().parse_args(argv)
    _check_outputs(args)
    read_checkpoint(args.checkpoint)  # a missing or corrupt file is reported before any model is built
    net = load_auglocal(args.checkpoint, exportable=True)  # timm: export-friendly layer variants
    report = export_onnx(net, args.out, input_size=args.input_size, opset=args.opset,
                         dynamic_batch=not args.static_batch, verify=not args.no_verify, atol=args.atol,
                         exporter=args.exporter)
    shape = "x".join(map(str, report.input_shape))
    print(f"wrote {report.path}: {net.plan.config.model} backbone, {report.nodes} nodes, opset {report.opset}, "
          f"input {shape}, {report.exporter} exporter")
    if report.fallback:
        print(f"note: {report.fallback}; used the torchscript exporter")
    if report.max_abs_diff is not None:
        print(f"onnxruntime vs PyTorch at batch {', '.join(map(str, report.batches))}: "
              f"max abs difference {report.max_abs_diff:.2e} (<= {args.atol * report.tolerance_scale:g}"
              + ("" if report.float32_error is None else
                 f"; PyTorch's own float32 error {report.float32_error:.2e}") + ")")
    if args.state_dict:
        save_backbone_state(net, args.state_dict)
        kwargs = net.options.get("model_kwargs") or {"num_classes": net.plan.head.out_shape[-1]}
        factory = net.options.get("model_factory")  # a recipe's model.factory: the model is the factory's
        args_text = ", ".join([*([] if factory else [repr(net.plan.config.model)]),
                               *(f"{k}={v!r}" for k, v in kwargs.items())])
        if factory:
            print(f"wrote {args.state_dict}: load into the model {factory}({args_text}) returns: "
                  "model.load_state_dict(torch.load(...))")
        else:
            print(f"wrote {args.state_dict}: load with timm.create_model({args_text}).load_state_dict(torch.load(...))")
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv), parser())


if __name__ == "__main__":
    sys.exit(main())
