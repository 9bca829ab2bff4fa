"""The rewritten, trainable module: gradient-isolated blocks, their aux nets and the model's head.

The per-block backward itself is ``blockwise.blockwise_step``."""

from __future__ import annotations

import torch
from torch import nn

from .blockwise import LocalUnit, StepOutput, blockwise_step
from .bundles import call, detach
from .checkpoint import save_net
from .plan import Plan

__all__ = ["AugLocalNet"]


class AugLocalNet(nn.Module):
    """``model`` cut into ``plan``'s blocks, each with its aux net; parameters shared with ``model``.

    In eval mode ``net(x)`` computes exactly what ``model(x)`` does. In train mode the blocks'
    outputs are detached, and ``training_step`` trains block by block: block i's backward finishes
    (and frees its activations) before block i+1's forward starts.

    Example:
        >>> net = to_auglocal(timm.create_model("resnet50"), blocks=16)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> out = net.training_step(x, y); opt.step(); opt.zero_grad()
    """

    def __init__(self, model: nn.Module, plan: Plan, blocks, head, aux, options: dict):
        super().__init__()
        self.model = model  # the backbone, trained in place
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.aux = nn.ModuleList(aux)
        self.plan = plan
        self.options = dict(options)

    # -- inference -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, last = x, len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h = call(block, h)
            if self.training and i < last:
                h = detach(h)
        return call(self.head, h)

    def head_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every aux head, then of the model's head: ``[aux_0, ..., aux_{M-2}, final]``.

        One pass through the blocks; used to report each local module's test accuracy.
        """
        outs, h = [], x
        for i, block in enumerate(self.blocks):
            h = call(block, h)
            if i < len(self.aux):
                outs.append(call(self.aux[i], h))
        return outs + [call(self.head, h)]

    # -- training ------------------------------------------------------------------------------
    def local_units(self) -> list[LocalUnit]:
        """The gradient-isolated units, in order: (block i, aux net i), ..., (last block, head).

        They share this net's modules but are not registered as its children (no duplicate state
        dict keys). To train data-parallel, wrap each unit in its own DistributedDataParallel and
        pass the list to ``training_step(units=...)``: each block's gradients are then averaged by
        its own backward, while the next block computes.
        """
        tops = list(self.aux) + [self.head]
        return [LocalUnit(block, top) for block, top in zip(self.blocks, tops)]

    def training_step(self, x: torch.Tensor, target: torch.Tensor, loss_fn=None,
                      autocast_dtype: torch.dtype | None = None, units=None) -> StepOutput:
        """Forward and backward, block by block; the caller steps its optimizer afterwards.

        ``loss_fn(logits, target)`` defaults to cross-entropy and serves every local loss too.
        ``autocast_dtype=torch.bfloat16`` runs forward passes under autocast. ``units`` replaces
        ``local_units()``, e.g. with DDP-wrapped units.
        """
        units = self.local_units() if units is None else units
        return blockwise_step(units, x, target, loss_fn, autocast_dtype)

    # -- parameter groups ----------------------------------------------------------------------
    def backbone(self) -> nn.Module:
        """The original model object, whose parameters the blocks train in place."""
        return self.model

    def aux_parameters(self):
        """Parameters of all aux nets (none for the ``bp`` rule)."""
        return self.aux.parameters()

    def block_parameters(self, i: int) -> list[nn.Parameter]:
        """Parameters trained by block ``i``'s loss: the block's own (the last block: plus the head)."""
        mods = [self.blocks[i]] + ([self.head] if i == len(self.blocks) - 1 else [])
        seen, out = set(), []
        for m in mods:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def save(self, path) -> None:
        """Write weights, plan and options to ``path`` atomically; read back with ``load_auglocal``."""
        save_net(self, path)

