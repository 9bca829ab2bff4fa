"""ResNet-20/32/56/110 for 32x32 inputs (He et al. 2016, as in the AugLocal code), registered with timm.

timm ships ImageNet ResNets only; the paper's CIFAR nets are these. Importing ``auglocal_fx``
registers ``resnet20_cifar`` ... ``resnet110_cifar``, so ``timm.create_model("resnet32_cifar")``,
``auglocal-convert --model resnet32_cifar`` and recipes all accept them. As the paper counts layers,
ResNet-(6n+2) has L = 1 + 3n: the stem and 3n basic blocks (16 for ResNet-32, 55 for ResNet-110).
"""

from __future__ import annotations

import torch
from timm.layers import SelectAdaptivePool2d, get_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet", "CIFAR_MEAN", "CIFAR_STD"]

# CIFAR-10 per-channel statistics: the models' pretrained_cfg and the training data normalise alike
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    """Two 3x3 convs and the residual add; a 1x1 conv + norm shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer, act_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(cout)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(cout)
        self.act2 = act_layer(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2): 3x3 stem (16 channels), three stages of n blocks (16, 32, 64), pool, fc.

    Keyword arguments follow timm's ResNet: ``num_classes``, ``in_chans``, ``global_pool``,
    ``drop_rate``, ``norm_layer`` and ``act_layer`` (names such as ``"groupnorm1"``, ``"gelu"``).
    """

    def __init__(self, depth: int = 32, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0, norm_layer="batchnorm2d", act_layer="relu", widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110), got {depth}")
        n = (depth - 2) // 6
        norm_layer, act_layer = get_norm_layer(norm_layer), get_act_layer(act_layer)
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.act1 = act_layer(inplace=True)
        cin = widths[0]
        for stage, cout in enumerate(widths):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1, norm_layer, act_layer))
                cin = cout
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_features = self.head_hidden_size = cin
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(cin * self.global_pool.feat_mult(), num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        # the same groups as timm's ResNet: the stem, then each block (coarse: each stage)
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        feats = self.num_features * self.global_pool.feat_mult()
        self.fc = nn.Linear(feats, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {"num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": CIFAR_MEAN, "std": CIFAR_STD,
            "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({f"resnet{d}_cifar": _cfg() for d in (20, 32, 56, 110)})


def _create(depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, f"resnet{depth}_cifar", pretrained, depth=depth, **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for 32x32 inputs (L = 10)."""
    return _create(20, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for 32x32 inputs (L = 16), the paper's main CIFAR net."""
    return _create(32, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for 32x32 inputs (L = 28)."""
    return _create(56, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for 32x32 inputs (L = 55)."""
    return _create(110, pretrained, **kwargs)
