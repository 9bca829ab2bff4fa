"""The per-block backward: a training step that runs each gradient-isolated unit's forward, local
loss and backward before the next unit starts, so one unit's activations are alive at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..errors import AugLocalError
from .bundles import Bundle, call, detach
from .recompute import run_maybe_recomputed
from .unit_optim import UnitOptimizers

__all__ = ["LocalUnit", "StepOutput", "autocast_context", "blockwise_step", "unit_step", "finish_unit"]


@dataclass
class StepOutput:
    """What one ``training_step`` returns. Losses are floats (tensors with ``blockwise_step(sync=False)``);
    logits are detached."""

    logits: torch.Tensor
    loss: float
    local_losses: list[float] = field(default_factory=list)
    aux_acc: list[float] = field(default_factory=list)


class LocalUnit(nn.Module):
    """One gradient-isolated unit: a block and the net its loss is computed on (aux net or head).

    ``unit(h)`` (``unit(*h)`` for a bundle) returns ``(block output, top output)``; the caller
    detaches the output before it feeds the next unit. ``recompute`` ("block" or "aux", see
    ``recompute.py``) recomputes that part's forward during the unit's backward instead of saving
    its activations. ``loss``: the rule's ``LocalLoss`` for the aux net (parameter-free); None
    when the top's output is the logits and the step's ``loss_fn`` is the loss.
    """

    def __init__(self, block: nn.Module, top: nn.Module, recompute: str = "none", loss: nn.Module | None = None):
        super().__init__()
        self.block, self.top, self.recompute = block, top, recompute
        self.loss = loss

    def forward(self, *h: torch.Tensor) -> tuple[Bundle, torch.Tensor | tuple]:
        out = self.block_forward(*h)
        return out, self.top_forward(out)

    def block_forward(self, *h: torch.Tensor) -> Bundle:
        """The block's part of ``forward`` (``overlap.py`` runs it apart from the top's)."""
        with record_function("auglocal.block"):
            return run_maybe_recomputed(self.block, h, self.recompute == "block")

    def top_forward(self, out: Bundle) -> torch.Tensor | tuple:
        """The aux net's (or head's) part of ``forward``, on the block's output ``out``."""
        with record_function("auglocal.top"):
            return run_maybe_recomputed(self.top, out if isinstance(out, tuple) else (out,), self.recompute == "aux")

    def local_loss(self, top: torch.Tensor | tuple, target: torch.Tensor, image: torch.Tensor,
                   loss_fn: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` of the top's output ``top``. A rule's own loss runs in float32 outside
        autocast (a similarity matrix or a reconstruction loss in bfloat16 would be too coarse)."""
        if self.loss is None:
            return loss_fn(top.float(), target), top
        with torch.autocast(image.device.type, enabled=False):
            return self.loss(_float(top), target, image.float(), loss_fn)

    def logits(self, top: torch.Tensor | tuple) -> torch.Tensor:
        """The logits part of the top's output (what accuracy is measured on)."""
        return top if self.loss is None else self.loss.logits(top)


def _float(out):
    if isinstance(out, tuple):
        return tuple(_float(t) for t in out)
    return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def blockwise_step(units: Sequence[nn.Module], x: torch.Tensor, target: torch.Tensor,
                   loss_fn: Callable | None = None, autocast_dtype: torch.dtype | None = None,
                   scaler: torch.amp.GradScaler | None = None,
                   optimizer: torch.optim.Optimizer | None = None, image: torch.Tensor | None = None,
                   hand_on: Callable[[Bundle], None] | None = None, sync: bool = True,
                   clip_grad: float | None = None, offload=None) -> StepOutput:
    """Forward and backward through ``units`` in order, each on the previous one's detached output
    (every tensor of a bundle detached).

    ``loss_fn(logits, target)`` (default cross-entropy) is the final loss and every unit's loss,
    except where a unit holds its rule's own loss (``LocalUnit.loss``, which gets ``loss_fn``, the
    targets and ``x`` the input batch). Gradients accumulate in the units' parameters; the caller steps its optimizer.
    Forward passes and losses run under autocast when ``autocast_dtype`` is given, backward passes
    outside it. With a ``scaler`` every loss is scaled before its backward (one scale for the whole
    step, so ``scaler.step(opt)`` unscales every unit's gradients alike); the losses reported are
    unscaled.

    With an ``optimizer`` (over any or all of the units' parameters), it is stepped right after each
    unit's backward and its gradients freed, so at most one unit's gradients are alive: the unit's
    parameters are final once its backward is done, and optimizers skip parameters without a
    gradient, so each step updates exactly that unit. For per-parameter optimizers (SGD, Adam,
    AdamW, ...) the updates equal one ``optimizer.step()`` after the whole step. A ``UnitOptimizers``
    built over these ``units`` steps unit i's own optimizer (``step_unit(i)``); any other optimizer
    walks all its parameters after every unit.

    A pipeline stage runs some of the units on a boundary tensor ``x`` another stage sent: then
    ``image`` is the model's input batch (for rules whose loss compares with it; default ``x``), and
    ``hand_on(h)`` receives the last unit's detached output as soon as its forward is done, before
    its backward, so the next stage can start on it while this one finishes.

    ``clip_grad``: each unit's gradients are clipped to this norm right after its backward (its
    parameters' gradients are all there then, and no other unit's).

    ``offload`` (an ``AuxOffload`` over these units and ``optimizer``): each aux net is brought onto
    the device before its unit and back to host memory after its update (``offload.py``).

    ``sync=False`` returns the losses and accuracies as tensors on the device (``loss`` 0-d, the
    others 1-d) instead of floats, so a loop that reads them only now and then never waits for the
    device between steps.
    """
    if clip_grad is not None and scaler is not None:
        raise AugLocalError("training_step(clip_grad=..., scaler=...): scaled gradients would be clipped at the "
                            "wrong norm; call scaler.unscale_(opt) and clip yourself, or use bfloat16 autocast")
    if optimizer is not None and scaler is not None:
        raise AugLocalError("training_step(optimizer=..., scaler=...): a GradScaler steps once per update; "
                            "pass optimizer=None and call scaler.step(opt) after the step")
    if offload is not None:
        offload.check_optimizer(optimizer)
    loss_fn = loss_fn or F.cross_entropy
    h, image = x, x if image is None else image
    amp = autocast_context(image.device.type, autocast_dtype)
    losses, accs = [], []
    last = len(units) - 1
    for i, unit in enumerate(units):
        if offload is not None:
            offload.ready(i)
        h, loss, acc, logits = unit_step(i, unit, h, target, image, loss_fn, amp, scaler, optimizer, clip_grad,
                                         hand_on if i == last else None)
        if offload is not None:
            offload.done(i)
        losses.append(loss)
        accs.append(acc)
    losses, accs = torch.stack(losses), torch.stack(accs)
    if sync:
        losses, accs = losses.tolist(), accs.tolist()  # one sync per step
    return StepOutput(logits.detach(), losses[-1], losses[:-1], accs[:-1])


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """What a step's forward passes and losses run under: autocast to ``dtype``, or nothing."""
    return torch.autocast(device_type=device_type, dtype=dtype) if dtype is not None else nullcontext()


def unit_step(i: int, unit: nn.Module, h: Bundle, target: torch.Tensor, image: torch.Tensor, loss_fn: Callable,
              amp, scaler=None, optimizer=None, clip_grad: float | None = None,
              hand_on: Callable[[Bundle], None] | None = None) -> tuple[Bundle, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit ``i``'s part of ``blockwise_step``: forward (under the context ``amp``), local loss, backward,
    clipping and update. Returns ``(its detached output, loss, accuracy, logits)``, the last three
    detached tensors on the device: no host sync, so a CUDA graph can hold it whole (``graphs.py``)."""
    local = getattr(unit, "module", unit)  # the LocalUnit inside a DistributedDataParallel
    with amp, record_function("auglocal.forward"):  # labels for torch.profiler (tools/bench_speed.py)
        out, top = call(unit, h)
    return finish_unit(i, local, out, top, target, image, loss_fn, amp, scaler, optimizer, clip_grad, hand_on)


def finish_unit(i: int, local: LocalUnit, out: Bundle, top, target: torch.Tensor, image: torch.Tensor,
                loss_fn: Callable, amp, scaler=None, optimizer=None, clip_grad: float | None = None,
                hand_on: Callable[[Bundle], None] | None = None) -> tuple[Bundle, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``unit_step`` after the unit's forward (block output ``out``, top output ``top``): local loss,
    backward, clipping and update, with the same returns."""
    with amp, record_function("auglocal.forward"):
        loss, logits = local.local_loss(top, target, image, loss_fn)
    if hand_on is not None:
        with record_function("auglocal.hand_on"):
            hand_on(detach(out))
    with record_function("auglocal.backward"):
        # frees this unit's graph before the next unit runs
        (loss if scaler is None else scaler.scale(loss)).backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(local.parameters(), clip_grad)
    if optimizer is not None:
        with record_function("auglocal.optimizer"):
            if isinstance(optimizer, UnitOptimizers):  # this unit's own parameters, nothing else walked
                optimizer.step_unit(i)
            else:  # only this unit's parameters hold gradients now: the others are skipped
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    # kept as tensors: .item() here would make a GPU wait for every block in turn
    return detach(out), loss.detach().float(), _accuracy(logits.detach(), target), logits.detach()


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of class logits (N, classes), or per position of (N, ..., classes) logits against
    integer targets (N, ...) (a language model's per-token logits); NaN for anything else."""
    if target.is_floating_point() or logits.dim() < 2 or tuple(target.shape) != tuple(logits.shape[:-1]):
        return torch.full((), float("nan"), device=logits.device)  # a fill, not a copy from the host: capturable
    return (logits.argmax(dim=-1) == target).float().mean()
