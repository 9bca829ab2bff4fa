"""Backprop with activation checkpointing at the plan's block boundaries: what a user would pick
instead of local learning to train in less memory, built from the same cuts so the two compare
block for block.

``checkpointed(model, blocks=K)`` plans ``model`` as ``to_auglocal`` does (same layers, same K
blocks, same ``balance``) and returns a module that trains end to end with one loss, each block but
the last run under ``torch.utils.checkpoint`` (non-reentrant): a block's forward keeps only its
input, and its activations are recomputed during the backward, one block at a time. So the
activations held are every block boundary plus one block's, at the price of a second forward of
every block but the last (about a third more compute). Batch-norm statistics are updated once, as
without checkpointing (the recompute's update is undone: ``recompute.frozen_norm_stats``). No aux
nets, no extra parameters; eval mode (or ``torch.no_grad()``) runs the blocks as they are, and
computes exactly what ``model`` does.
``costs.checkpointed_footprint`` estimates its memory beside ``bp_footprint``.

timm's own ``model.set_grad_checkpointing()`` does the same at the model's stage or block
granularity, where a family implements it (its recompute updates batch-norm statistics a second
time); this one works on any model the compiler can trace.
"""

from __future__ import annotations

import torch
from torch import nn

from .assemble.emit import emit_pieces
from .compiler import set_classes
from .errors import AugLocalError
from .options import resolve
from .plan import Plan, PlanConfig
from .planner import build_plan
from .runtime.bundles import call
from .runtime.net import _own_forward
from .runtime.recompute import run_maybe_recomputed

__all__ = ["CheckpointedModel", "checkpointed"]


class CheckpointedModel(nn.Module):
    """``model`` cut into ``plan``'s blocks, trained end to end with each block but the last
    checkpointed; parameters shared with ``model``."""

    def __init__(self, model: nn.Module, plan: Plan, blocks: list[nn.Module], head: nn.Module):
        super().__init__()
        self.model = model  # the parameters, trained in place
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.plan = plan

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        h = inputs[0] if len(inputs) == 1 else inputs
        save_less = self.training and torch.is_grad_enabled()
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # the last block's activations are needed at once by the backward: not checkpointed
            h = run_maybe_recomputed(block, h if isinstance(h, tuple) else (h,), save_less and i < last)
        return call(self.head, h)

    def compile(self, *args, **kwargs) -> None:
        """Compile every block and the head in place with ``torch.compile(*args, **kwargs)``, each
        under its checkpoint (as ``AugLocalNet.compile``): ``torch.compile(ck)`` whole cannot trace
        the checkpoint's ``context_fn`` that keeps batch-norm statistics from updating twice."""
        for module in [*self.blocks, self.head]:
            _own_forward(module)
            module.compile(*args, **kwargs)

    def training_step(self, x: torch.Tensor | tuple, target: torch.Tensor, loss_fn=None) -> torch.Tensor:
        """One loss on the model's logits and its backward (the caller steps its optimizer), as
        ``AugLocalNet.training_step`` is called; returns the loss, detached."""
        loss = (loss_fn or torch.nn.functional.cross_entropy)(self(*(x if isinstance(x, tuple) else (x,))), target)
        loss.backward()
        return loss.detach()


def checkpointed(model: nn.Module, options: PlanConfig | int | None = None, /, *, example_inputs=None,
                 **overrides) -> CheckpointedModel:
    """``model`` with activation checkpointing at the boundaries of the K blocks ``to_auglocal``
    would cut (``checkpointed(model, 16)``; planning options as for ``to_auglocal``).

    Example:
        >>> ck = checkpointed(timm.create_model("resnet50"), blocks=16)
        >>> loss = F.cross_entropy(ck(x), y); loss.backward()
    """
    config = resolve(PlanConfig, options, overrides)
    if config.blocks is None:
        raise AugLocalError("pass blocks=K, the number of blocks whose boundaries are checkpointed")
    set_classes(model, config.num_classes)
    plan = build_plan(model, config, example_inputs=example_inputs)
    blocks, head, _, _ = emit_pieces(model, plan)
    return CheckpointedModel(model, plan, blocks, head)
