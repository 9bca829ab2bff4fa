"""``auglocal-export``: the trained backbone of a checkpoint as ONNX, checked in onnxruntime."""

from __future__ import annotations

import argparse
import sys

from ..checkpoint import read_checkpoint
from ..compiler import load_auglocal
from ..errors import AugLocalError
from ..export import EXPORTERS, export_onnx, save_backbone_state
from .common import run_cli

PROG = "auglocal-export"
FLAGS = {"input_size": "--input-size", "exporter": "--exporter"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export the backbone of a converted or trained model (aux nets stripped) to ONNX and "
                    "check it against PyTorch in onnxruntime.")
    p.add_argument("checkpoint", help="a file from auglocal-train (last.pt, best.pt) or auglocal-convert --save")
    p.add_argument("--out", required=True, help="the ONNX file to write, e.g. model.onnx")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's, 20 for dynamo)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size without batch (default: the size the model was converted at)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension at 1 (default: dynamic)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="torch.onnx exporter; auto (default): dynamo, torchscript only if dynamo cannot "
                        "convert the model (see the README for why)")
    p.add_argument("--no-verify", action="store_true", help="skip onnx.checker and the onnxruntime comparison")
    p.add_argument("--atol", type=float, default=1e-4, help="largest |onnxruntime - PyTorch| accepted, times the output magnitude when above 1 (default 1e-4)")
    p.add_argument("--state-dict", metavar="PATH",
                   help="also write the backbone's state dict (loads strictly into timm.create_model)")
    return p


def _main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.opset is not None and not 7 <= args.opset <= 25:
        raise AugLocalError(f"--opset {args.opset} is out of range; use 17 to 23, or leave it out")
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
              f"max abs difference {report.max_abs_diff:.2e} (<= {args.atol * report.tolerance_scale:g})")
    if args.state_dict:
        save_backbone_state(net, args.state_dict)
        kwargs = net.options.get("model_kwargs") or {"num_classes": net.plan.head.out_shape[-1]}
        call = ", ".join([repr(net.plan.config.model), *(f"{k}={v!r}" for k, v in kwargs.items())])
        print(f"wrote {args.state_dict}: load with timm.create_model({call}).load_state_dict(torch.load(...))")
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv), FLAGS)


if __name__ == "__main__":
    sys.exit(main())
