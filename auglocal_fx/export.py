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
import copy
import io
import logging
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
from torch.utils._pytree import tree_leaves

from .atomic import atomic_write, check_output_path
from .errors import AugLocalError, first_line
from .models import default_input_size
from .modes import eval_mode
from .passes.trace import positional_names, training_kwargs
from .runtime.net import AugLocalNet

__all__ = ["EXPORTERS", "OPSETS", "ExportReport", "check_opset", "export_onnx", "save_backbone_state"]

EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17  # the tracing exporter's best-tested opset
# The opsets each exporter writes as asked (torch 2.14, onnxscript 0.7, onnx 1.23, onnxruntime 1.32;
# tests/test_export.py checks the ends). The dynamo exporter translates at 18 or above; asked for
# less, it lets ONNX's version converter lower the graph, which works for some graphs (a ViT to 17)
# and not others (a ResNet's ReduceMean): export_onnx then refuses rather than write opset 18. Above
# 25 it writes graphs onnxruntime cannot load. The TorchScript exporter knows 7 to 23 (single ops may
# need more, e.g. attention 14; it says so).
OPSETS = {"dynamo": (7, 25), "torchscript": (7, 23)}
DYNAMO_NATIVE_OPSET = 18  # the lowest opset the dynamo exporter translates to directly
# Verification: float32 computes a well-conditioned network with outputs of order 1 to about this
# absolute error (max |PyTorch float32 - float64|); ``atol`` is the tolerance for such a network and
# grows in proportion for a network that float32 itself computes less precisely.
FLOAT32_REFERENCE_ERROR = 1e-6


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
    float32_error: float | None = None  # max |PyTorch float32 - PyTorch float64| over the check

    @property
    def tolerance_scale(self) -> float:
        """What ``atol`` is multiplied by: how many times worse than ``FLOAT32_REFERENCE_ERROR`` float32
        computes this network (at least 1); without a float64 run (a model that cannot run in float64),
        the output's magnitude when that exceeds 1."""
        if self.float32_error is not None:
            return max(1.0, self.float32_error / FLOAT32_REFERENCE_ERROR)
        return max(1.0, self.output_scale or 0.0)


class _AsTrained(nn.Module):
    """The backbone as its plan trained it: the one output the plan picked (a Hugging Face model's
    ``logits``), with the keywords it was traced with (``trace.training_kwargs``). Its input names are
    the model's."""

    def __init__(self, model: nn.Module, output: str | int | None, kwargs: dict):
        super().__init__()
        self.model, self.output, self.kwargs = model, output, kwargs
        self.input_names = positional_names(model)

    def forward(self, *inputs):
        out = self.model(*inputs, **self.kwargs)
        if self.output is None:
            return out
        return out[self.output] if isinstance(out, dict | tuple | list) else getattr(out, self.output)


def _backbone(obj: nn.Module) -> tuple[nn.Module, tuple[int, ...] | None, str]:
    """(the backbone, the planned input size or None, a name)."""
    if isinstance(obj, AugLocalNet):
        name = obj.plan.config.model or type(obj.model).__name__
        kwargs = training_kwargs(obj.model)
        output = obj.plan.config.output
        model = obj.model if output is None and not kwargs else _AsTrained(obj.model, output, kwargs)
        return model, tuple(obj.plan.config.input_size), name
    if isinstance(obj, nn.Module):
        return obj, None, type(obj).__name__
    raise AugLocalError(f"export_onnx takes an AugLocalNet or an nn.Module, got {type(obj).__name__}")


def check_opset(opset: int | None, exporter: str = "auto") -> None:
    """Refuse an opset ``exporter`` cannot write (``OPSETS``), before any work is done."""
    if opset is None:
        return
    if exporter not in EXPORTERS:
        raise AugLocalError.bad_value("exporter", exporter, f"is not an exporter; choose one of {', '.join(EXPORTERS)}")
    if exporter == "auto":
        low, high = min(lo for lo, _ in OPSETS.values()), max(hi for _, hi in OPSETS.values())
        what = "for ONNX export"
    else:
        low, high = OPSETS[exporter]
        what = f"for the {exporter} exporter"
    if not low <= opset <= high:
        raise AugLocalError.bad_value("opset", opset, f"is out of range {what}: use {low} to {high}, "
                                      "or leave it out for the default")


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation chatter, and log the version converter's failures
    with a traceback; the report, or the error, says what matters."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


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


def _export(model: nn.Module, example: tuple[torch.Tensor, ...], tmp: Path, exporter: str, opset: int | None,
            dynamic: bool) -> None:
    inputs = _input_names(model, len(example))
    names = {"input_names": inputs, "output_names": ["logits"]}
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in example) if dynamic else None
        if shapes is not None and isinstance(model, _AsTrained):  # forward(*inputs): one argument, a tuple
            shapes = (shapes,)
        program = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                    verbose=False, **names)
        program.save(str(tmp), external_data=False)
        written = _opset(onnx.load(str(tmp), load_external_data=False))
        if opset is not None and written != opset:
            raise RuntimeError(f"it wrote opset {written}, not {opset}: ONNX's version converter could not "
                               f"lower this graph (the dynamo exporter translates to {DYNAMO_NATIVE_OPSET} and above)")
    else:
        axes = {**{name: {0: "batch"} for name in inputs}, "logits": {0: "batch"}} if dynamic else None
        torch.onnx.export(model, example, str(tmp), dynamo=False, dynamic_axes=axes,
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
    outputs on random inputs at two batch sizes (one when ``dynamic_batch=False``) lie within the
    tolerance of PyTorch's float32 eval outputs, or AugLocalError names the difference and nothing is
    written. The tolerance is ``atol`` times ``max(1, e / 1e-6)``, where ``e`` is PyTorch's own float32
    error on those inputs (max |float32 - float64 output|): ``atol`` holds for a network float32
    computes to 1e-6, and one float32 computes less precisely (large or ill-conditioned activations;
    random-init networks reach outputs of 1e9, or amplify rounding errors a million-fold) gets a
    tolerance in proportion, 100 times ``e`` at the default ``atol``; no file can do better than float32.
    ``opset`` must be one ``OPSETS[exporter]`` allows, and is written as asked or refused.
    The file appears atomically; ``path`` must not be a folder.
    """
    if exporter not in EXPORTERS:
        raise AugLocalError.bad_value("exporter", exporter, f"is not an exporter; choose one of {', '.join(EXPORTERS)}")
    check_opset(opset, exporter)
    if not atol >= 0:
        raise AugLocalError.bad_value("atol", atol, "is not a number >= 0; give a tolerance such as 1e-4")
    path = check_output_path(path, (), "path")
    model, planned, name = _backbone(net_or_model)
    if input_size is None:
        input_size = planned or default_input_size(model)
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) < 1 or any(v < 1 for v in input_size):
        raise AugLocalError.bad_value("input_size", input_size, "is not a shape: give positive integers "
                                      "without the batch, e.g. (3, 224, 224)")
    if path.parent and not path.parent.is_dir():
        raise AugLocalError(f"cannot write {path}: folder {path.parent} does not exist; create it first")

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    specs = (net_or_model.plan.config.input_specs(input_size) if isinstance(net_or_model, AugLocalNet)
             else [(input_size, "float32")])
    draw = _input_sampler(model, specs, gen)
    example = tuple(x.to(device) for x in draw(2 if dynamic_batch else 1))

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # a folder that takes no files (read-only, /proc) is the user's path, not an exporter's failure
        tmp.touch()
        tmp.unlink()
    except OSError as exc:
        raise AugLocalError(f"cannot write {path} ({exc.strerror}); choose another path") from exc
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    if opset is not None:  # auto: only the exporters that can write the opset asked for
        order = [e for e in order if OPSETS[e][0] <= opset <= OPSETS[e][1]]
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
            batches = (1, 3) if dynamic_batch else (example[0].shape[0],)
            report.max_abs_diff, report.output_scale, report.float32_error = _verify(
                model, tmp, draw, batches, device)
            report.batches = batches
            limit = atol * report.tolerance_scale
            if not report.max_abs_diff <= limit:
                own = ("" if report.float32_error is None else f"; PyTorch's own float32 error is "
                       f"{report.float32_error:.3g} (float32 vs float64)")
                raise AugLocalError(f"onnxruntime output of {path.name} differs from PyTorch by "
                                    f"{report.max_abs_diff:.3g} (> {limit:g}); not written{own}. Try --exporter "
                                    f"{'torchscript' if used == 'dynamo' else 'dynamo'}, or --no-verify to keep it")
        os.replace(tmp, path)
        return report
    finally:
        tmp.unlink(missing_ok=True)


def _input_names(model: nn.Module, n: int) -> list[str]:
    """ONNX input names: "input" for a model of one input, else its forward's argument names."""
    if n == 1:
        return ["input"]
    names = getattr(model, "input_names", None) or positional_names(model)
    names = names[:n]
    return names if len(names) == n else [f"input_{i}" for i in range(n)]


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _float64_copy(model: nn.Module) -> nn.Module | None:
    """``model`` in float64, to measure how precisely float32 computes it; None for a model that
    cannot be copied (a layer that refuses deepcopy)."""
    try:
        return copy.deepcopy(model).double()
    except Exception:  # any failure only means no float64 reference: the magnitude rule applies
        return None


def _input_sampler(model: nn.Module, specs: list[tuple[tuple[int, ...], str]], gen: torch.Generator):
    """``batch -> random inputs`` (a tuple, one per ``(size, dtype)`` of ``specs``): normal floats,
    masks mostly true, or integer ids every embedding table of ``model`` can look up (a language
    model's token ids)."""
    high = min((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), default=2)

    def one(b: int, size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if dtype.is_floating_point:
            return torch.randn(b, *size, generator=gen).to(dtype)
        if dtype == torch.bool:  # an attention mask: a row masked out entirely would give NaN
            return torch.rand(b, *size, generator=gen) > 0.1
        return torch.randint(0, high, (b, *size), generator=gen, dtype=dtype)

    return lambda b: tuple(one(b, tuple(size), getattr(torch, dtype)) for size, dtype in specs)


def _verify(model: nn.Module, file: Path, draw, batches, device) -> tuple[float, float, float | None]:
    """Full ``onnx.checker`` check, then over ``batches`` the largest |onnxruntime - PyTorch|, |PyTorch|,
    and |PyTorch float32 - PyTorch float64| (None when the model does not run in float64)."""
    try:
        onnx.checker.check_model(str(file), full_check=True)
    except (ValidationError, InferenceError) as exc:
        raise AugLocalError(f"the exported graph fails onnx.checker ({_exporter_message(exc)})") from exc
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    feeds = [i.name for i in session.get_inputs()]
    worst = scale = 0.0
    model64 = _float64_copy(model)
    own: float | None = 0.0 if model64 is not None else None
    with eval_mode(model), torch.no_grad():
        for b in batches:
            xs = draw(b)
            # every output, in order: a model returning a dict / tuple exports one ONNX output per tensor
            refs = [t.float().cpu() for t in tree_leaves(model(*(x.to(device) for x in xs)))]
            if model64 is not None:
                try:
                    with eval_mode(model64):
                        x64 = (x.double() if x.is_floating_point() else x for x in xs)
                        exact = [t.double().cpu() for t in tree_leaves(model64(*(x.to(device) for x in x64)))]
                    own = max(own, *(float((r.double() - e).abs().max()) for r, e in zip(refs, exact)))
                # A model that hard-codes float32 somewhere (a buffer made in forward) cannot run in
                # float64: no reference, the magnitude rule applies.
                except Exception:
                    model64, own = None, None
            try:
                outs = [torch.from_numpy(o) for o in session.run(None, {f: x.numpy() for f, x in zip(feeds, xs)})]
            except (OrtFail, OrtInvalidArgument) as exc:
                raise AugLocalError(f"onnxruntime cannot run the exported graph at batch {b} "
                                    f"({_exporter_message(exc)})") from exc
            if [o.shape for o in outs] != [r.shape for r in refs]:
                raise AugLocalError(f"onnxruntime output shapes {[tuple(o.shape) for o in outs]} differ from "
                                    f"PyTorch's {[tuple(r.shape) for r in refs]} at batch {b}")
            worst = max(worst, *(float((o - r).abs().max()) for o, r in zip(outs, refs)))
            scale = max(scale, *(float(r.abs().max()) for r in refs))
    return worst, scale, own


def save_backbone_state(net_or_model: nn.Module, path: str | os.PathLike) -> None:
    """The backbone's ``state_dict`` (aux nets stripped), loadable with ``strict=True`` into a fresh
    instance of the architecture (``timm.create_model(name, num_classes=...)``). Atomic."""
    model, _, _ = _backbone(net_or_model)
    if isinstance(model, _AsTrained):  # the architecture's own keys
        model = model.model
    path = check_output_path(path, (), "path")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))
