"""Export the trained backbone (aux nets stripped) to ONNX and check it in onnxruntime.

What is exported is ``net.model``: the original architecture, whose parameters the blocks trained
in place, so the file has exactly the nodes a direct export of the original model has.

Exporter: torch.onnx's dynamo exporter (``torch.export``) by default; ``exporter="auto"`` (the
default) falls back to the TorchScript exporter only when dynamo cannot convert the graph (e.g.
hiera's 5-D attention), and the report says so. The dynamo exporter is the maintained path
(the default of ``torch.onnx.export`` since PyTorch 2.9), records timm's fused attention
(``F.scaled_dot_product_attention``) and dynamic SAME padding as graph ops instead of tracing
them into constants, never scripts timm's activations, and refuses a batch dimension it cannot
keep dynamic instead of silently fixing it. ``exporter="torchscript"`` forces the older tracing
exporter (faster to run, deprecated, about twice the nodes on transformers) for models the
dynamo path cannot capture.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from onnx.checker import ValidationError
from onnx.shape_inference import InferenceError
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument
from torch import nn

from .atomic import atomic_write
from .errors import AugLocalError, first_line
from .models import default_input_size
from .modes import eval_mode
from .net import AugLocalNet

__all__ = ["EXPORTERS", "ExportReport", "export_onnx", "save_backbone_state"]

EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17  # the tracing exporter's best-tested opset


@dataclass
class ExportReport:
    path: str
    exporter: str
    opset: int
    nodes: int  # top-level graph nodes
    input_shape: list  # "batch" for the dynamic dimension
    max_abs_diff: float | None  # onnxruntime vs PyTorch eval output; None when not verified
    batches: tuple[int, ...] = ()  # batch sizes the check ran
    output_scale: float | None = None  # max |PyTorch output| over the check
    fallback: str | None = None  # exporter="auto": why dynamo was not used

    @property
    def tolerance_scale(self) -> float:
        """What ``atol`` is multiplied by: 1, or the output's magnitude when that exceeds 1."""
        return max(1.0, self.output_scale or 0.0)


def _backbone(obj: nn.Module) -> tuple[nn.Module, tuple[int, ...] | None, str]:
    if isinstance(obj, AugLocalNet):
        return obj.model, tuple(obj.plan.config.input_size), obj.plan.config.model or type(obj.model).__name__
    if isinstance(obj, nn.Module):
        return obj, None, type(obj).__name__
    raise AugLocalError(f"export_onnx takes an AugLocalNet or an nn.Module, got {type(obj).__name__}")


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation chatter; the report says what matters."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NO_ONNX_OP = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'")


def _exporter_message(exc: BaseException) -> str:
    """The line that says what went wrong; the dynamo exporter puts it under "Exception summary"
    in a report with colour codes, and names an op ONNX lacks deep inside."""
    text = _ANSI.sub("", str(exc)).strip()
    missing = _NO_ONNX_OP.search(text)
    if missing:
        return f"ONNX has no translation for {missing.group(1)}"
    if "## Exception summary" in text:
        text = re.sub(r"^<class '[^']+'>:\s*", "", text.split("## Exception summary", 1)[1].strip())
    return first_line(RuntimeError(text), with_type=False)


def _export(model: nn.Module, example: torch.Tensor, tmp: Path, exporter: str, opset: int | None,
            dynamic: bool) -> None:
    names = {"input_names": ["input"], "output_names": ["logits"]}
    if exporter == "dynamo":
        shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                    verbose=False, **names)
        program.save(str(tmp), external_data=False)
    else:
        axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, dynamic_axes=axes,
                          opset_version=opset or TORCHSCRIPT_OPSET, **names)


def export_onnx(
    net_or_model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: tuple[int, ...] | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
    exporter: str = "auto",
    seed: int = 0,
) -> ExportReport:
    """Write the backbone of ``net_or_model`` (an AugLocalNet or a plain model) to ``path`` as ONNX.

    ``input_size`` is (C, H, W) without batch; default: the plan's, or the model's timm config.
    With ``verify`` (default) the file passes ``onnx.checker`` (full check) and onnxruntime's
    outputs on random inputs at two batch sizes (one when ``dynamic_batch=False``) lie within
    ``atol`` of PyTorch's eval outputs, or AugLocalError names the difference and nothing is written.
    For outputs larger than 1 in magnitude (random-init networks without residuals reach 1e9),
    ``atol`` scales with that magnitude: float32 cannot do better. The file appears atomically.
    """
    if exporter not in EXPORTERS:
        raise AugLocalError.bad_value("exporter", exporter, f"is not an exporter; choose one of {', '.join(EXPORTERS)}")
    model, planned, name = _backbone(net_or_model)
    if input_size is None:
        input_size = planned or default_input_size(model)
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) < 1 or any(v < 1 for v in input_size):
        raise AugLocalError.bad_value("input_size", input_size, "is not a shape: give positive integers "
                                      "without the batch, e.g. (3, 224, 224)")
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise AugLocalError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(2 if dynamic_batch else 1, *input_size, generator=gen).to(device)

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    try:
        fallback = None
        with eval_mode(model), torch.no_grad(), _quiet():
            for used in order:
                try:
                    _export(model, example, tmp, used, opset, dynamic_batch)
                    break
                # Any failure means this exporter cannot convert the model: the two exporters raise
                # types of their own from several layers (torch.export, dynamo, onnxscript, the
                # TorchScript tracer); the cause is chained for whoever debugs it.
                except Exception as exc:
                    tmp.unlink(missing_ok=True)
                    reason = f"{type(exc).__name__}: {_exporter_message(exc)}"
                    if used != order[-1]:
                        fallback = f"{used} exporter failed ({reason})"
                        continue
                    batch = dynamic_batch and re.search(r"(?i)constraint|specializ|dynamic|guard", reason)
                    other = "torchscript" if used == "dynamo" else "dynamo"
                    hint = "pass --static-batch" if batch else (
                        "both exporters failed" if fallback else f"try --exporter {other}")
                    before = f"{fallback}; " if fallback else ""
                    raise AugLocalError(f"ONNX export of {name} failed with the {used} exporter "
                                        f"({before}{reason}); {hint}") from exc
        proto = onnx.load(str(tmp), load_external_data=False)
        dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        report = ExportReport(str(path), used, _opset(proto), len(proto.graph.node), dims, None, fallback=fallback)
        if verify:
            batches = (1, 3) if dynamic_batch else (example.shape[0],)
            report.max_abs_diff, report.output_scale = _verify(model, tmp, input_size, batches, gen, device)
            report.batches = batches
            limit = atol * report.tolerance_scale
            if not report.max_abs_diff <= limit:
                raise AugLocalError(f"onnxruntime output of {path.name} differs from PyTorch by "
                                    f"{report.max_abs_diff:.3g} (> {limit:g}); not written. Try --exporter "
                                    f"{'torchscript' if used == 'dynamo' else 'dynamo'}, or --no-verify to keep it")
        os.replace(tmp, path)
        return report
    finally:
        tmp.unlink(missing_ok=True)


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _verify(model: nn.Module, file: Path, input_size, batches, gen: torch.Generator, device) -> tuple[float, float]:
    """Full ``onnx.checker`` check, then the largest |onnxruntime - PyTorch| and |PyTorch| over ``batches``."""
    try:
        onnx.checker.check_model(str(file), full_check=True)
    except (ValidationError, InferenceError) as exc:
        raise AugLocalError(f"the exported graph fails onnx.checker ({_exporter_message(exc)})") from exc
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    worst = scale = 0.0
    with eval_mode(model), torch.no_grad():
        for b in batches:
            x = torch.randn(b, *input_size, generator=gen)
            ref = model(x.to(device)).float().cpu()
            try:
                out = torch.from_numpy(session.run(None, {feed: x.numpy()})[0])
            except (OrtFail, OrtInvalidArgument) as exc:
                raise AugLocalError(f"onnxruntime cannot run the exported graph at batch {b} "
                                    f"({_exporter_message(exc)})") from exc
            if out.shape != ref.shape:
                raise AugLocalError(f"onnxruntime output shape {tuple(out.shape)} differs from PyTorch's "
                                    f"{tuple(ref.shape)} at batch {b}")
            worst = max(worst, float((out - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
    return worst, scale


def save_backbone_state(net_or_model: nn.Module, path: str | os.PathLike) -> None:
    """The backbone's ``state_dict`` (aux nets stripped), loadable with ``strict=True`` into a fresh
    instance of the architecture (``timm.create_model(name, num_classes=...)``). Atomic."""
    model, _, _ = _backbone(net_or_model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))
