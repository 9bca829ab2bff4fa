"""Check one timm, torchvision or Hugging Face transformers model end to end: convert -> axis audit ->
eval parity -> one training step -> ONNX parity.

``tools/zoo_check.py`` runs :func:`check_model` over one model per timm family, over every
torchvision classification model (``--source torchvision``) or over every transformers image
classifier, sequence classifier and causal LM from a tiny config (``--source hf``, ``hf_zoo.py``),
each in its own process with a time limit; the default test suite runs it over a dozen diverse timm
families and a few torchvision models. Token models are planned from an example batch and compared
on their output's logits; causal LMs train on the per-token loss.
"""

from __future__ import annotations

import fnmatch
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from ..assemble.axis_audit import audit_aux, audit_axes
from ..assemble.synthesize import synthesize_aux
from ..compiler import to_auglocal
from ..errors import AugLocalError, first_line
from ..export import export_onnx
from ..passes.layouts import UNKNOWN
from ..passes.module_groups import repeated_blocks
from ..planner import analyze_model, available_memory, build_plan
from .hf_zoo import architectures, create_case, logits

__all__ = ["SOURCES", "STAGES", "ZooResult", "check_model", "families", "smallest", "create_small"]

STAGES = ("convert", "axes", "parity", "train", "onnx")
BASELINES = ("dgl", "infopro", "predsim")  # rules whose own aux heads the axis audit checks too
SOURCES = ("timm", "torchvision", "hf")
SIDES = (64, 96, 128, 160, 224)  # input sides tried, smallest first
PARITY_ATOL = 1e-5
ONNX_ATOL = 1e-4


@dataclass
class ZooResult:
    model: str
    family: str
    passed: list[str] = field(default_factory=list)  # the stages passed, in order
    failed: str | None = None  # the stage that failed (or "create")
    error: str | None = None  # one line
    input_size: list[int] | None = None
    layers: int | None = None
    repeated_blocks: int | None = None  # module_groups.repeated_blocks: the module tree's repeated units
    widest_cut: int | None = None  # the most tensors one layer boundary hands on
    blocks: int | None = None
    axes_checked: int | None = None  # adapters and aux heads audited (axis_audit.py)
    axes_wrong: list[str] = field(default_factory=list)  # one line per module contracting a non-channel axis
    axes_disagree: int | None = None  # tensors whose measured layout differs from the graph's reading
    axes_unknown: int | None = None  # crossing tensors whose layout neither tells
    parity_diff: float | None = None
    onnx_diff: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return len(self.passed) == len(STAGES)

    @property
    def granular(self) -> bool | None:
        """At least one layer per repeated block of the module tree (None before conversion)."""
        if self.layers is None or self.repeated_blocks is None:
            return None
        return self.layers >= self.repeated_blocks

    def to_dict(self) -> dict:
        return {**asdict(self), "granular": self.granular}


def families(pattern: str | None = None, source: str = "timm") -> dict[str, list[str]]:
    """timm's model families (the module a model is defined in) -> its model names. For
    torchvision: every classification model, each its own family; for hf: every transformers image
    classifier, sequence classifier and causal LM class, by model type (``hf_zoo.py``)."""
    if source == "hf":
        out: dict[str, list[str]] = {}
        for name, (model_type, _) in architectures(pattern).items():
            out.setdefault(model_type, []).append(name)
        return out
    if source == "torchvision":
        names = torchvision.models.list_models(module=torchvision.models)
        return {n: [n] for n in names if not pattern or fnmatch.fnmatch(n, pattern)}
    out = {}
    for module in sorted(timm.list_modules()):
        if module == "cifar_resnet":  # ours (auglocal_fx.cifar_resnet), not one of timm's families
            continue
        names = timm.list_models(module=module)
        if pattern:
            names = [n for n in names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(module, pattern)]
        if names:
            out[module] = names
    return out


def _param_count(name: str) -> float:
    try:
        with torch.device("meta"):
            model = timm.create_model(name)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # a model that cannot be built on the meta device, for any reason, sorts last
        return float("inf")


def smallest(names: list[str]) -> str:
    """The variant with the fewest parameters (counted on the meta device: no memory, no init)."""
    return min(names, key=lambda n: (_param_count(n), n))


def _torchvision_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A torchvision classifier with random weights; GoogLeNet / Inception without their auxiliary
    classifiers (in train mode those return a tuple; see docs/guide/your-model.md on ``output=``)."""
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def create_small(name: str, num_classes: int = 10, source: str = "timm") -> tuple[nn.Module, tuple[int, ...]]:
    """``name`` with random weights at the smallest square input side (from ``SIDES``, else its
    default) that it builds and runs at. Models that take ``img_size`` (torchvision ViTs:
    ``image_size``) are built for that side."""
    if source == "torchvision":
        native, size_kw = (3, 299, 299) if name == "inception_v3" else (3, 224, 224), "image_size"

        def build(**kw):
            return _torchvision_model(name, num_classes, **kw)
    else:
        cfg = timm.models.get_pretrained_cfg(name)
        native, size_kw = tuple((cfg.input_size if cfg is not None else None) or (3, 224, 224)), "img_size"

        def build(**kw):
            return timm.create_model(name, num_classes=num_classes, **kw)
    sides = [s for s in SIDES if s < native[-1]] + [native[-1]]
    first_error = None
    for side in sides:
        for kwargs in ({}, {size_kw: side}) if side != native[-1] else ({},):
            try:
                model = build(**kwargs)
                size = (native[0], side, side)
                with torch.no_grad():
                    model.eval()(torch.randn(1, *size))
                return model, size
            except Exception as exc:  # whatever a model raises at a size it cannot take: try the next
                first_error = first_error or exc
    raise AugLocalError(f"{name} runs at none of the input sides {sides} ({first_line(first_error, 240)})")


@dataclass
class _Case:
    """What the check feeds a model: a batch of two, its targets, the step's loss (None:
    cross-entropy); token inputs are planned from an example, images from their size."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: object = None

    @property
    def plan_inputs(self) -> dict:
        if self.x.is_floating_point():
            return {"input_size": tuple(self.x.shape[1:])}
        return {"example_inputs": self.x[:1]}


def _create(name: str, source: str, seed: int) -> _Case:
    torch.manual_seed(seed)
    if source == "hf":
        return _Case(*create_case(name, seed))
    model, size = create_small(name, source=source)
    g = torch.Generator().manual_seed(seed)
    return _Case(model, torch.randn(2, *size, generator=g), torch.randint(0, 10, (2,), generator=g))


def _bp_trained(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the parameters plain backprop gives a gradient (some models hold unused ones)."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits(model(x)).float().sum().backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return names


def _check_memory(model: nn.Module, plan) -> None:
    """Refuse, in one line, a model whose check would not fit in memory, before building its aux
    nets: the weights of the backbone and of every aux net's copies, plus the larger of the
    largest unit's gradients (per-unit steps) and the float64 copy the ONNX check runs."""
    backbone = sum(p.numel() for p in model.parameters())
    aux = [sum(plan.layers[j].params for j in r.selected_layers) + plan.head.params for r in plan.aux]
    units = [plan.block_sum(b, "params") + (aux[b.index] if b.index < len(aux) else plan.head.params)
             for b in plan.blocks]
    need, have = 4 * (backbone + sum(aux)) + max(4 * max(units), 8 * backbone), available_memory()
    if have is not None and need > have:
        raise AugLocalError(f"needs about {need / 2**30:.0f} GiB (weights of {backbone / 1e6:.0f}M backbone and "
                            f"{sum(aux) / 1e6:.0f}M aux-net parameters, a float64 copy for the ONNX check), more "
                            f"than the {have / 2**30:.0f} GiB available")


def _audit(result: ZooResult, model: nn.Module, net, analysis, k: int, name: str, inputs: dict) -> None:
    """The axis audit of ``net``'s adapters and light heads, and of the dgl / infopro / predsim aux
    heads on the same layers; raises when one contracts anything but the channel axis."""
    checks = audit_axes(net)
    for rule in BASELINES:
        try:
            plan = build_plan(model, k, **inputs, model_name=name, analysis=analysis, rule=rule)
            checks += audit_aux(plan, synthesize_aux(model, plan, [], None, "fresh")[0])
        except AugLocalError:  # a rule without a head for this layout says so; not the audit's concern
            continue
    result.axes_checked = len(checks)
    result.axes_wrong = [c.line() for c in checks if not c.ok]
    result.axes_disagree = len(analysis.axes.disagreements)
    result.axes_unknown = sum(v == UNKNOWN for v in analysis.axes.layouts.values())
    if result.axes_wrong:
        raise AugLocalError(f"{len(result.axes_wrong)} of {len(checks)} adapters / aux heads contract another "
                            f"axis than the channels: {result.axes_wrong[0]}")


def check_model(name: str, family: str = "", blocks: int = 16, seed: int = 0, source: str = "timm") -> ZooResult:
    """Run the stages (``STAGES``) on ``name`` (from ``source``: timm, torchvision or hf); the first failure
    is recorded (one line), never raised."""
    result = ZooResult(name, family)
    start = time.perf_counter()
    stage = "create"
    try:
        case = _create(name, source, seed)
        model, x, y, inputs = case.model, case.x, case.y, case.plan_inputs
        result.input_size = list(x.shape[1:])
        trained_by_bp = _bp_trained(model, x)

        stage = "convert"
        analysis = analyze_model(model, **inputs)
        result.layers = len(analysis.layers)
        result.repeated_blocks = repeated_blocks(model)
        result.widest_cut = analysis.widest_cut
        k = min(blocks, result.layers)
        plan = build_plan(model, k, **inputs, model_name=name, analysis=analysis)
        _check_memory(model, plan)
        net = to_auglocal(model, plan=plan)
        result.blocks = len(net.blocks)
        result.passed.append(stage)

        stage = "axes"
        _audit(result, model, net, analysis, k, name, inputs)
        result.passed.append(stage)

        stage = "parity"
        with torch.no_grad():
            ref, out = logits(model.eval()(x)), net.eval()(x)
        result.parity_diff = float((out.float() - ref.float()).abs().max())
        if not torch.allclose(out, ref, rtol=PARITY_ATOL, atol=PARITY_ATOL):
            raise AugLocalError(f"eval output differs from the original by {result.parity_diff:.3g}")
        result.passed.append(stage)

        stage = "train"
        net.train()
        model.zero_grad(set_to_none=True)
        # per-unit optimizer steps (at most one unit's gradients alive: 640M-parameter models fit);
        # which parameters got a gradient is recorded as it accumulates, before the step frees it
        got: set[int] = set()
        hooks = [p.register_post_accumulate_grad_hook(lambda p: got.add(id(p))) for p in net.parameters() if p.requires_grad]
        try:  # the step also moves the weights before the export (zero-init heads included)
            step = net.training_step(x, y, loss_fn=case.loss_fn,
                                     optimizer=torch.optim.SGD(net.parameters(), lr=1e-3, foreach=False))
        finally:
            for h in hooks:
                h.remove()
        losses = [step.loss, *step.local_losses]
        if not all(v == v and abs(v) != float("inf") for v in losses):
            raise AugLocalError(f"non-finite loss {losses}")
        grads = {n for n, p in model.named_parameters() if id(p) in got}
        missing = sorted(trained_by_bp - grads)
        if missing:
            raise AugLocalError(f"{len(missing)} parameters get no gradient, e.g. {missing[0]}")
        # an aux net's copy of a parameter the model's own output never reads (a pooler a causal LM skips)
        untrained = {n for n, p in model.named_parameters() if p.requires_grad} - trained_by_bp
        aux_missing = [n for n, p in net.aux.named_parameters() if p.requires_grad and id(p) not in got
                       and n.split("train_graph.", 1)[-1] not in untrained]
        if aux_missing:
            raise AugLocalError(f"{len(aux_missing)} aux-net parameters get no gradient, e.g. {aux_missing[0]}")
        result.passed.append(stage)

        stage = "onnx"
        with tempfile.TemporaryDirectory() as tmp:
            report = export_onnx(net, Path(tmp) / f"{name}.onnx", atol=ONNX_ATOL)
        result.onnx_diff = report.max_abs_diff / report.tolerance_scale  # divided by the float32-error scale: compare with ONNX_ATOL
        result.passed.append(stage)
    except Exception as exc:  # a zoo run records every failure, bug or not, and goes on
        result.failed, result.error = stage, first_line(exc, 240)
        if not isinstance(exc, AugLocalError) and stage != "create":
            frames = traceback.extract_tb(exc.__traceback__)
            where = next((f for f in reversed(frames) if "auglocal_fx" in f.filename), None)
            if where is not None:
                result.error += f" [{Path(where.filename).name}:{where.lineno}]"
    result.seconds = round(time.perf_counter() - start, 2)
    return result
