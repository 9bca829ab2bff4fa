"""Models written the way people write PyTorch, shared by the tests (no timm, no torchvision).

One residual network, ``ResNet``, serves every CIFAR-style case: the paper's ResNet-(6n+2)
(``cifar_resnet``), a small one with its blocks in a ``Sequential`` (``small_resnet``), and the
random widths and strides of the property tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNet", "cifar_resnet", "small_resnet", "RootResidualNet", "PlainCNN", "TokenMLP"]


class BasicBlock(nn.Module):
    """ResNet basic block; the residual add lives inside the block (1x1-conv shortcut when channels or
    resolution change, as in the AugLocal reference code)."""

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


class ResNet(nn.Module):
    """Stem + one basic block per ``widths`` entry (with its ``strides`` entry) + pool + fc.

    Layers as the paper counts them: L = 1 (stem) + len(widths). ``container`` holds the blocks in
    a ``ModuleList`` (looped over in forward) or a ``Sequential``.
    """

    def __init__(self, widths: Sequence[int], strides: Sequence[int], num_classes: int = 10,
                 container: str = "list"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for w, s in zip(widths, strides):
            blocks.append(BasicBlock(cin, w, s))
            cin = w
        self.blocks = nn.ModuleList(blocks) if container == "list" else nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(n: int = 1, num_classes: int = 10) -> ResNet:
    """ResNet-(6n+2) for 3x32x32: three stages of n blocks (16/32/64 channels). n=5 is ResNet-32
    (L=16), n=18 is ResNet-110 (L=55)."""
    widths = [c for c in (16, 32, 64) for _ in range(n)]
    strides = [2 if (i == 0 and stage > 0) else 1 for stage in range(3) for i in range(n)]
    return ResNet(widths, strides, num_classes)


def small_resnet(num_classes: int = 10) -> ResNet:
    """Six narrow blocks (8, 8, 16, 16, 32, 32 channels) in a Sequential: L = 7."""
    return ResNet((8, 8, 16, 16, 32, 32), (1, 1, 2, 1, 2, 1), num_classes, container="sequential")


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


class PlainCNN(nn.Module):
    """conv-BN-ReLU layers without residuals, one per ``widths`` entry."""

    def __init__(self, widths: Sequence[int], strides: Sequence[int], num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for w, s in zip(widths, strides):
            layers.append(nn.Sequential(nn.Conv2d(cin, w, 3, s, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()))
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TokenBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TokenMLP(nn.Module):
    """Patches -> tokens (T, D) -> residual MLP blocks -> mean over tokens -> classifier."""

    def __init__(self, dim: int, depth: int, patch: int = 4, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[TokenBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.fc(self.norm(self.blocks(x)).mean(1))
