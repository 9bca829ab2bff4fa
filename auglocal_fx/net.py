"""The rewritten, trainable module: gradient-isolated blocks, their aux nets and the model's head."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .plan import Plan

__all__ = ["AugLocalNet", "LocalUnit", "StepOutput"]


@dataclass
class StepOutput:
    """What one ``training_step`` returns. Losses are floats; logits are detached."""

    logits: torch.Tensor
    loss: float
    local_losses: list[float] = field(default_factory=list)
    aux_acc: list[float] = field(default_factory=list)


class LocalUnit(nn.Module):
    """One gradient-isolated unit: a block and the net its loss is computed on (aux net or head).

    ``unit(h)`` returns ``(block output, logits)``; the caller detaches the output before it feeds
    the next unit.
    """

    def __init__(self, block: nn.Module, top: nn.Module):
        super().__init__()
        self.block, self.top = block, top

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with record_function("auglocal.block"):
            out = self.block(h)
        with record_function("auglocal.top"):
            return out, self.top(out)


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
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.training and i < last:
                x = x.detach()
        return self.head(x)

    def head_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every aux head, then of the model's head: ``[aux_0, ..., aux_{M-2}, final]``.

        One pass through the blocks; used to report each local module's test accuracy.
        """
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.aux):
                outs.append(self.aux[i](x))
        return outs + [self.head(x)]

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
        loss_fn = loss_fn or F.cross_entropy
        amp = (torch.autocast(device_type=x.device.type, dtype=autocast_dtype)
               if autocast_dtype is not None else nullcontext())
        units = self.local_units() if units is None else units
        losses, accs = [], []
        h = x
        for unit in units:
            with amp, record_function("auglocal.forward"):  # labels for torch.profiler (tools/bench_speed.py)
                out, logits = unit(h)
                loss = loss_fn(logits.float(), target)
            with record_function("auglocal.backward"):
                loss.backward()  # frees this unit's graph before the next unit runs
            # kept as tensors: .item() here would make a GPU wait for every block in turn
            losses.append(loss.detach().float())
            accs.append(_accuracy(logits.detach(), target))
            h = out.detach()
            del out, loss
        losses, accs = torch.stack(losses).tolist(), torch.stack(accs).tolist()  # one sync per step
        return StepOutput(logits.detach(), losses[-1], losses[:-1], accs[:-1])

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
        from .checkpoint import save_net  # noqa: PLC0415  (avoids an import cycle)

        save_net(self, path)


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.dim() != 1 or logits.dim() != 2:
        return torch.tensor(float("nan"), device=logits.device)
    return (logits.argmax(dim=1) == target).float().mean()
