"""The InfoPro baseline (Wang et al., ICLR 2021) as the AugLocal reference code builds it
(``networks/auxiliary_nets.py`` ``AuxNetwork`` 'InfoPro' and ``Decoder_InfoPro``, ``networks/resnet.py``).

The aux net has two parts and returns ``(logits, reconstruction)``:
- classifier: 3x3 conv (no bias) to W channels, norm, ReLU, global average pool, Linear(W, 128),
  ReLU, Linear(128, classes). The reference hard-codes ResNet-32's three stages (16 -> 32 and
  32 -> 64 with stride 2, 64 -> 64 with stride 1); ours says the same for any CNN: double the
  channels with stride 2, except at the backbone's widest stage, which keeps both.
- decoder: bilinear upsample (``align_corners=True``) to the input image's H x W, 3x3 conv to 12
  channels, norm, ReLU, 3x3 conv to the image's channels. The reference ends with a sigmoid and
  ``nn.BCELoss``; ours hands the pre-sigmoid map to ``binary_cross_entropy_with_logits``, the same
  loss computed stably (and allowed under autocast).

Loss: ``lambda_rec(i) * BCE(decoder, un-normalised image) + lambda_cls(i) * CE(logits)``, with both
weights interpolated linearly over the aux nets i = 0..M-2 (ratio i / (M - 2)), from
``LAMBDA_REC[0]``, ``LAMBDA_CLS[0]`` at the first to ``[1]`` at the last. The defaults are the
reference's ResNet-32 (K=16) values in ``run.sh``: 5 -> 0.2 and 0.05 -> 0.5 (its ResNet-110, K=55:
5 -> 0.5 and 0 -> 1; register a rule with other weights through ``functools.partial(build_loss,
rec=..., cls=...)``). The image is restored with ``AugLocalNet.image_stats`` and clamped to [0, 1].

Ours beyond the reference: the norms follow the model's kind; channels-last maps are permuted
first; for (T, D) tokens the classifier is a per-token Linear, LayerNorm, ReLU, the mean over
tokens and the same MLP, and the decoder reads the last g*g tokens (g = isqrt(T); timm puts
class and register tokens first) as a g x g map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..assemble.adapters import TokenMean, TokensToMap
from ..errors import AugLocalError
from .rule import AuxContext, LocalLoss, Rule, register_rule

__all__ = ["LAMBDA_CLS", "LAMBDA_REC", "HIDDEN", "DECODER_WIDTH", "InfoProAux", "InfoProLoss",
           "build_aux", "build_loss", "interpolate"]

LAMBDA_REC = (5.0, 0.2)  # reconstruction weight, first aux net -> last (reference run.sh, ResNet-32 K=16)
LAMBDA_CLS = (0.05, 0.5)  # classification weight, first -> last
HIDDEN = 128  # the classifier MLP's width (hard-coded in the reference)
DECODER_WIDTH = 12  # the decoder's hidden channels


class InfoProAux(nn.Module):
    """``prep`` (a layout change, or nothing), then the classifier and the decoder side by side."""

    def __init__(self, prep: nn.Module, classifier: nn.Module, decoder: nn.Module):
        super().__init__()
        self.prep, self.classifier, self.decoder = prep, classifier, decoder

    def forward(self, x):
        h = self.prep(x)
        return self.classifier(h), self.decoder(h)


class LastTokens(nn.Module):
    """(N, T, D) -> (N, n, D): the last ``n`` tokens (the patch grid after any prefix tokens)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x[:, x.shape[1] - self.n:]


def build_aux(ctx: AuxContext) -> nn.Module:
    classes, image = ctx.num_classes, ctx.image_shape
    if len(image) != 3:
        raise AugLocalError(f"the infopro rule reconstructs an image, and the model's input has shape {image}, "
                            "not (C, H, W); use rule='dgl' or 'auglocal'")
    widest = ctx.max_channels
    v = ctx.view("infopro", maps=(2,))
    if v.kind == "map":
        c = v.channels
        width, stride = (c, 1) if c >= widest else (2 * c, 2)
        classifier = nn.Sequential(nn.Conv2d(c, width, 3, stride, 1, bias=False), ctx.norm2d(width),
                                   nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), *_mlp(width, classes))
        return InfoProAux(v.to_first or nn.Identity(), classifier, _decoder(ctx, c))
    if v.kind == "tokens":
        t, d = v.spatial[0], v.channels
        width = d if d >= widest else 2 * d
        g = math.isqrt(t)
        classifier = nn.Sequential(nn.Linear(d, width, bias=False), nn.LayerNorm(width), nn.ReLU(inplace=True),
                                   TokenMean(), *_mlp(width, classes))
        to_map = nn.Sequential(LastTokens(g * g), TokensToMap(g, g))
        return InfoProAux(nn.Identity(), classifier, nn.Sequential(to_map, *_decoder(ctx, d)))
    raise AugLocalError(f"the infopro rule has no decoder for activations of shape {ctx.in_shape} (it needs a map or "
                        "tokens); use rule='dgl' or 'auglocal'")


def _mlp(width: int, classes: int) -> list[nn.Module]:
    return [nn.Linear(width, HIDDEN), nn.ReLU(inplace=True), nn.Linear(HIDDEN, classes)]


def _decoder(ctx: AuxContext, c: int) -> nn.Sequential:
    channels, h, w = ctx.image_shape
    return nn.Sequential(nn.Upsample(size=(h, w), mode="bilinear", align_corners=True),
                         nn.Conv2d(c, DECODER_WIDTH, 3, 1, 1), ctx.norm2d(DECODER_WIDTH), nn.ReLU(inplace=True),
                         nn.Conv2d(DECODER_WIDTH, channels, 3, 1, 1))


def interpolate(i: int, count: int, weights: tuple[float, float]) -> float:
    """Weight of aux net ``i`` of ``count``: linear from ``weights[0]`` (first) to ``weights[1]`` (last)."""
    ratio = i / (count - 1) if count > 1 else 0.0
    return weights[0] * (1 - ratio) + weights[1] * ratio


class InfoProLoss(LocalLoss):
    """``rec_weight * BCE(reconstruction, restored image) + cls_weight * criterion(logits, target)``."""

    needs_image = True

    def __init__(self, rec_weight: float, cls_weight: float, mean, std):
        super().__init__()
        self.rec_weight, self.cls_weight = rec_weight, cls_weight
        self.register_buffer("mean", torch.zeros(0), persistent=False)  # not in the state dict
        self.register_buffer("std", torch.zeros(0), persistent=False)
        self.set_image_stats(mean, std)

    def set_image_stats(self, mean, std) -> None:
        for name, values in (("mean", mean), ("std", std)):
            old = getattr(self, name)
            new = torch.tensor(values, dtype=torch.float32, device=old.device).view(1, -1, 1, 1)
            if old.shape == new.shape:
                old.copy_(new)  # in place: a DistributedDataParallel holding the buffer keeps seeing it
            else:
                setattr(self, name, new)

    def restore(self, image: torch.Tensor) -> torch.Tensor:
        """The input batch as it was before normalisation, in [0, 1]."""
        return (image * self.std + self.mean).clamp(0, 1)

    def forward(self, out, target, image, criterion):
        logits, rec = out
        truth = self.restore(image)
        if truth.shape[-2:] != rec.shape[-2:]:  # trained at another size than planned: compare at the decoder's
            truth = F.interpolate(truth, size=rec.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        loss = self.rec_weight * F.binary_cross_entropy_with_logits(rec, truth)
        return loss + self.cls_weight * criterion(logits, target), logits

    def extra_repr(self) -> str:
        return f"rec_weight={self.rec_weight:.4g}, cls_weight={self.cls_weight:.4g}"


def build_loss(ctx: AuxContext, rec: tuple[float, float] = LAMBDA_REC,
               cls: tuple[float, float] = LAMBDA_CLS) -> InfoProLoss:
    i, m = ctx.index, ctx.num_aux
    return InfoProLoss(interpolate(i, m, rec), interpolate(i, m, cls), ctx.image_mean, ctx.image_std)


register_rule(Rule("infopro", "the InfoPro baseline: a conv classifier and an image decoder; "
                   "weighted BCE reconstruction + cross-entropy", build_aux, build_loss=build_loss))
