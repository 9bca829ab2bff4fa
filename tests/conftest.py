"""Shared fixtures: hand-written models and a session-wide cache of created + analysed models.

Every timm / torchvision model is created with random weights (offline) and traced / profiled
once per test session; tests build plans from the cached ``Analysis`` (cheap).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auglocal_fx import analyze_model
from auglocal_fx.pipeline import Analysis


# -- shared checks ----------------------------------------------------------------------------------
def assert_gradient_isolation(net, x: torch.Tensor, y: torch.Tensor) -> None:
    """No parameter is trained by two losses, and each block's gradient in a joint ``training_step``
    equals the gradient of its own local loss alone (blocks before it run without a graph)."""
    net.train()
    state = copy.deepcopy(net.state_dict())
    net.zero_grad(set_to_none=True)
    net.training_step(x, y)
    k = len(net.blocks)
    groups = [net.block_parameters(i) + (list(net.aux[i].parameters()) if i < k - 1 else []) for i in range(k)]
    ids = [{id(p) for p in g} for g in groups]
    for i in range(k):
        for j in range(i + 1, k):
            assert not ids[i] & ids[j], f"blocks {i} and {j} share parameters"
    together = [[None if p.grad is None else p.grad.clone() for p in g] for g in groups]
    for i in range(k):
        net.load_state_dict(state)  # same batch-norm statistics as in the joint step
        net.zero_grad(set_to_none=True)
        h = x
        with torch.no_grad():
            for j in range(i):
                h = net.blocks[j](h)
        out = net.blocks[i](h)
        logits = net.aux[i](out) if i < k - 1 else net.head(out)
        F.cross_entropy(logits, y).backward()
        for p, g in zip(groups[i], together[i]):
            if g is None:
                assert p.grad is None
            else:
                torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
        others = [p for j in range(k) if j != i for p in groups[j]]
        assert all(p.grad is None for p in others), f"loss {i} leaked gradient into another block"


# -- hand-written models -------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """CIFAR ResNet basic block; the residual add lives inside the block (1x1-conv shortcut when
    channels or resolution change, as in the AugLocal reference code)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 3x32x32: stem Sequential + ModuleList of 3n residual blocks + pool + fc.

    As the paper counts layers: L = 1 (stem) + 3n blocks; n=5 is ResNet-32 (L=16), n=18 is
    ResNet-110 (L=55).
    """

    def __init__(self, n: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for stage, c in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(cin, c, 2 if (i == 0 and stage > 0) else 1))
                cin = c
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class RootResidualNet(nn.Module):
    """Residual adds written in the root forward (``x = x + block(x)``), not inside the blocks."""

    def __init__(self, width: int = 8, depth: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            for _ in range(depth))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.fc(self.pool(x).flatten(1))


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
    "cifar_resnet8": Spec(lambda: CifarResNet(1), (3, 32, 32), 4, 10),
    "root_residual": Spec(lambda: RootResidualNet(), (3, 32, 32), 4, 10),
    # the paper's CIFAR nets, for the reference selection values
    "cifar_resnet32": Spec(lambda: CifarResNet(5), (3, 32, 32), 16, 10),
    "cifar_resnet110": Spec(lambda: CifarResNet(18), (3, 32, 32), 55, 10),
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
