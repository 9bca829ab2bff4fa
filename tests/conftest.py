"""Shared fixtures: a session-wide cache of created + analysed models (hand-written ones: handwritten.py).

Every timm / torchvision model is created with random weights (offline) and traced / profiled
once per test session; tests build plans from the cached ``Analysis`` (cheap).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from auglocal_fx.planner import Analysis, analyze_model

from handwritten import RootResidualNet, cifar_resnet


# -- the model zoo ---------------------------------------------------------------------------------
def _timm(name: str) -> Callable[[], nn.Module]:
    def make():
        import timm

        return timm.create_model(name, pretrained=False)

    return make


def _tv_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None)


@dataclass(frozen=True)
class Spec:
    make: Callable[[], nn.Module]
    input_size: tuple[int, ...] | None  # None: the model's own default (timm pretrained_cfg)
    num_layers: int  # layers as the paper counts them (head excluded)
    num_classes: int


SPECS: dict[str, Spec] = {
    # stem + 16 bottlenecks (3, 4, 6, 3)
    "resnet50": Spec(_timm("resnet50"), None, 17, 1000),
    # patch embed (+ cls / pos embed) + 12 transformer blocks
    "vit_tiny_patch16_224": Spec(_timm("vit_tiny_patch16_224"), None, 13, 1000),
    # stem + 12 ConvNeXt blocks (2, 2, 6, 2); each stage's downsample joins its first block
    "convnext_atto": Spec(_timm("convnext_atto"), None, 13, 1000),
    # stem + 16 MBConv blocks (1, 2, 2, 3, 3, 4, 1); conv_head/bn2 join the last block (timm groups)
    "efficientnet_b0": Spec(_timm("efficientnet_b0"), None, 17, 1000),
    # torchvision: no group_matcher, layers from the module tree: stem + 8 basic blocks
    "tv_resnet18": Spec(_tv_resnet18, None, 9, 1000),
    # hand-written, stem + 3 residual blocks
    "cifar_resnet8": Spec(lambda: cifar_resnet(1), (3, 32, 32), 4, 10),
    "root_residual": Spec(lambda: RootResidualNet(), (3, 32, 32), 4, 10),
    # the paper's CIFAR nets, for the reference selection values
    "cifar_resnet32": Spec(lambda: cifar_resnet(5), (3, 32, 32), 16, 10),
    "cifar_resnet110": Spec(lambda: cifar_resnet(18), (3, 32, 32), 55, 10),
}


@dataclass
class Case:
    name: str
    model: nn.Module
    analysis: Analysis
    input_size: tuple[int, ...]
    num_layers: int
    num_classes: int


class Zoo:
    """Creates and analyses each model once, on first use."""

    def __init__(self):
        self._cases: dict[str, Case] = {}

    def __call__(self, name: str) -> Case:
        if name not in self._cases:
            spec = SPECS[name]
            torch.manual_seed(0)
            model = spec.make().eval()
            analysis = analyze_model(model, spec.input_size)
            self._cases[name] = Case(name, model, analysis, tuple(analysis.input_size),
                                     spec.num_layers, spec.num_classes)
        return self._cases[name]


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    return Zoo()


@pytest.fixture(scope="session")
def resnet50(zoo) -> Case:
    return zoo("resnet50")


@pytest.fixture(scope="session")
def vit(zoo) -> Case:
    return zoo("vit_tiny_patch16_224")


@pytest.fixture(scope="session")
def fresh_model() -> Callable[[str], nn.Module]:
    """A new, un-analysed instance of a zoo model (for tests that mutate or check mutation)."""
    return lambda name: SPECS[name].make()


# -- test tiers ------------------------------------------------------------------------------------
# `make test-fast` (-m "not slow and not heavy") is the edit loop: pure-Python units, no subprocess,
# no torchrun, no zoo, no ONNX export. These modules spawn processes (the CLIs, training runs,
# torchrun, crashes), walk many timm families or export to ONNX, so they are "heavy": in `make test`,
# not in the fast tier.
HEAVY_MODULES = {
    "test_cli": "runs the commands in subprocesses",
    "test_crash": "kills training subprocesses",
    "test_errors": "runs every command's error cases, some in subprocesses",
    "test_pipeline": "torchrun",
    "test_tools": "runs the benchmark tools",
    "test_training": "training runs, a two-process gloo run",
    "test_zoo": "the zoo check's stages on timm and torchvision families",
    "test_export": "ONNX export and onnxruntime",
    "test_bundles": "timm families' granularity",
    "test_own_model": "training runs of a recipe's own model and data, the CLIs in subprocesses, ONNX export",
    "test_export_frontend": "torch.export traces, Hugging Face transformers models",
    "test_host_memory": "steps in child processes (the allocator setting is process-wide)",
    "test_gpu_suite": "the GPU suite's dry run: training runs, a child process compiling",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: subprocesses, torchrun, the zoo or ONNX; left out of make test-fast")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in HEAVY_MODULES:
            item.add_marker(pytest.mark.heavy)
