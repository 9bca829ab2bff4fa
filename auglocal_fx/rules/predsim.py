"""The PredSim baseline (Nøkland & Eidnes, ICML 2019) as the AugLocal reference code builds it
(``networks/auxiliary_nets.py`` 'PredSim', ``Decoder_PredSim``, ``networks/losses.py`` ``SimLoss``,
``utils/others.py`` ``get_pool_layer``).

The aux net returns ``(logits, similarity features)``:
- sim: a 3x3 conv (C -> C, no bias) at full resolution. Its batch similarity matrix (per-channel
  standard deviation over space, centred, cosine over the batch) is matched, mean squared error,
  to the same matrix of the one-hot labels (1 within a class, -1/(classes - 1) across).
- pred: average pooling to about ``POOL_FEATURES`` (512) features (kernel doubled in height, then
  width, until C x h x w <= 512; as adaptive pooling to that grid), flatten, Linear to classes.
Loss: ``SIM_WEIGHT * sim + PRED_WEIGHT * CE`` = 0.99 / 0.01 (reference ``run.sh``, every module).

Ours beyond the reference: channels-last maps are permuted first; for (T, D) tokens the sim part
is a per-token Linear(D, D, no bias) whose per-channel std is taken over the tokens, and the pred
part the mean over tokens and a Linear; (D,) features take the features themselves (the
reference's fallback: flattened) and a Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..assemble.adapters import TokenMean
from ..errors import AugLocalError
from .rule import AuxContext, LocalLoss, Rule, register_rule

__all__ = ["POOL_FEATURES", "PRED_WEIGHT", "SIM_WEIGHT", "PredSimAux", "PredSimLoss", "build_aux", "build_loss",
           "pool_grid", "similarity_matrix"]

SIM_WEIGHT, PRED_WEIGHT = 0.99, 0.01
POOL_FEATURES = 512  # the reference's --hidden_dim default


class PredSimAux(nn.Module):
    """``prep`` (a layout change, or nothing), then the prediction and the similarity branches."""

    def __init__(self, prep: nn.Module, pred: nn.Module, sim: nn.Module):
        super().__init__()
        self.prep, self.pred, self.sim = prep, pred, sim

    def forward(self, x):
        h = self.prep(x)
        return self.pred(h), self.sim(h)


def pool_grid(c: int, h: int, w: int, target: int = POOL_FEATURES) -> tuple[int, int]:
    """The grid the reference's ``get_pool_layer`` pools a C x H x W map to: kernel height and width
    doubled in turn (height first) until C x grid <= ``target`` or the kernel spans the height."""
    kh = kw = 1
    oh, ow = h, w
    while c * oh * ow > target and kh < h:
        kh *= 2
        oh = math.ceil(h / kh)
        if c * oh * ow > target:
            kw *= 2
            ow = math.ceil(w / kw)
    return oh, ow


def build_aux(ctx: AuxContext) -> nn.Module:
    v, classes = ctx.view("predsim", maps=(2,)), ctx.num_classes
    if v.kind == "map":
        c, (h, w) = v.channels, v.spatial
        grid = pool_grid(c, h, w)
        pred = nn.Sequential(nn.AdaptiveAvgPool2d(grid), nn.Flatten(), nn.Linear(c * grid[0] * grid[1], classes))
        return PredSimAux(v.to_first or nn.Identity(), pred, nn.Conv2d(c, c, 3, 1, 1, bias=False))
    if v.kind == "tokens":
        d = v.channels
        return PredSimAux(nn.Identity(), nn.Sequential(TokenMean(), nn.Linear(d, classes)), nn.Linear(d, d, bias=False))
    return PredSimAux(nn.Identity(), nn.Linear(v.channels, classes), nn.Identity())


def similarity_matrix(h: torch.Tensor) -> torch.Tensor:
    """B x B cosine similarity of the centred rows of ``h`` (the reference's ``similarity_matrix``).

    A map (B, C, H, W) with C > 3 and H > 1 is first reduced to each channel's standard deviation
    over space, tokens (B, T, D) with T > 1 to each channel's over the tokens; anything else is
    flattened."""
    if h.dim() == 4 and h.shape[1] > 3 and h.shape[2] > 1:
        z = h.flatten(2).std(dim=2)
    elif h.dim() == 3 and h.shape[1] > 1:
        z = h.std(dim=1)
    else:
        z = h.flatten(1)
    z = z - z.mean(dim=1, keepdim=True)
    z = z / (1e-8 + z.norm(dim=1, keepdim=True))
    return (z @ z.t()).clamp(-1, 1)


class PredSimLoss(LocalLoss):
    """``sim_weight * MSE(S(features), S(one-hot labels)) + pred_weight * criterion(logits, target)``."""

    def __init__(self, sim_weight: float = SIM_WEIGHT, pred_weight: float = PRED_WEIGHT):
        super().__init__()
        self.sim_weight, self.pred_weight = sim_weight, pred_weight

    def forward(self, out, target, image, criterion):
        logits, feats = out
        soft = target.is_floating_point() and target.shape == logits.shape  # mixup's class distributions
        if not soft and (target.dim() != 1 or logits.dim() != 2):
            raise AugLocalError(f"the predsim rule matches the similarity of class labels and needs one label (or "
                                f"class distribution) per sample, not targets of shape {tuple(target.shape)}; use "
                                "rule='auglocal' or 'dgl'")
        labels = target.float() if soft else F.one_hot(target, logits.shape[1]).float()
        sim = F.mse_loss(similarity_matrix(feats), similarity_matrix(labels))
        return self.sim_weight * sim + self.pred_weight * criterion(logits, target), logits

    def extra_repr(self) -> str:
        return f"sim_weight={self.sim_weight}, pred_weight={self.pred_weight}"


def build_loss(ctx: AuxContext, sim: float = SIM_WEIGHT, pred: float = PRED_WEIGHT) -> PredSimLoss:
    return PredSimLoss(sim, pred)


register_rule(Rule("predsim", "the PredSim baseline: a 3x3 conv matched to the labels' batch similarity, "
                   "a pooled linear prediction; 0.99 MSE + 0.01 cross-entropy", build_aux, build_loss=build_loss))
