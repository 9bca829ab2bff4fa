"""Unit k's aux net, backward and update beside unit k+1's block forward, on two CUDA streams.

What unit k+1's block needs from unit k is block k's output, detached, nothing more: not aux net k,
not unit k's gradients, not its update. So once block k's forward is issued, block k+1's forward can
start on a second stream while unit k's aux forward, loss, backward and update run on the first.
``overlapped_step`` issues the units in that order (block 0; block 1 | unit 0's rest; block 2 |
unit 1's rest; ...), each unit on stream ``k % 2``, with an event between a block's forward and the
next block's. Every unit computes what it computes in ``blockwise_step`` (the same kernels on the
same values), so the weights after any number of steps are the same; only random draws (dropout)
come in another order. The price in memory: block k+1's activations are held while unit k's
backward runs, one more block's than the plain step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AugLocalError
from .blockwise import StepOutput, autocast_context, finish_unit
from .bundles import Bundle, detach

__all__ = ["CudaStreams", "overlapped_step"]


class CudaStreams:
    """Two side streams of ``device`` that the units alternate on, and the events between them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))

    def begin(self, tensors: list[torch.Tensor]) -> None:
        """Both streams start after what the current stream queued (the batch); ``tensors`` are read on both."""
        current = torch.cuda.current_stream(self.device)
        for s in self.streams:
            s.wait_stream(current)
            for t in tensors:
                t.record_stream(s)

    @contextmanager
    def on(self, k: int):
        with torch.cuda.stream(self.streams[k % 2]):
            yield

    def mark(self, k: int):
        """An event after what stream ``k % 2`` queued so far."""
        return self.streams[k % 2].record_event()

    def hand(self, event, tensors: list[torch.Tensor], k: int) -> None:
        """Stream ``k % 2`` waits for ``event`` and reads ``tensors`` made on the other stream."""
        stream = self.streams[k % 2]
        stream.wait_event(event)
        for t in tensors:
            t.record_stream(stream)

    def end(self) -> None:
        current = torch.cuda.current_stream(self.device)
        for s in self.streams:
            current.wait_stream(s)


def overlapped_step(units: list[nn.Module], x: Bundle, target: torch.Tensor, loss_fn: Callable | None = None,
                    autocast_dtype: torch.dtype | None = None, optimizer=None, image: torch.Tensor | None = None,
                    sync: bool = True, clip_grad: float | None = None, offload=None, streams=None) -> StepOutput:
    """``blockwise_step`` with each block's forward issued before the previous unit's aux net,
    backward and update, on alternating CUDA streams (``streams``: a ``CudaStreams``, made for the
    batch's device by default). The same arguments and returns as ``blockwise_step`` (no ``scaler``,
    no ``hand_on``: one process's units, not DDP-wrapped ones)."""
    if any(hasattr(u, "module") for u in units):
        raise AugLocalError("overlap runs each unit's block apart from its aux net, which a DistributedDataParallel "
                            "unit does not allow; train data-parallel without overlap")
    tensors = _tensors(x) + [target] + ([image] if image is not None else [])
    if streams is None:
        device = tensors[0].device
        if device.type != "cuda":
            raise AugLocalError(f"overlap runs units on two CUDA streams, and the batch is on {device}; train on a "
                                "GPU, or without overlap")
        streams = CudaStreams(device)
    if offload is not None:
        offload.check_optimizer(optimizer)
    loss_fn = loss_fn or F.cross_entropy
    image = _tensors(x)[0] if image is None else image
    amp = autocast_context(image.device.type, autocast_dtype)
    streams.begin(tensors)
    losses, accs, last = [], [], len(units) - 1
    with streams.on(0), amp:
        outs = {0: units[0].block_forward(*_args(x))}
    marks = {0: streams.mark(0)}
    for k, unit in enumerate(units):
        if k < last:  # the next block's forward first: it needs this block's output only
            streams.hand(marks[k], _tensors(outs[k]), k + 1)
            with streams.on(k + 1), amp:
                outs[k + 1] = units[k + 1].block_forward(*_args(detach(outs[k])))
            marks[k + 1] = streams.mark(k + 1)
        with streams.on(k):
            if offload is not None:
                offload.ready(k)
            with amp:
                top = unit.top_forward(outs[k])
            _, loss, acc, logits = finish_unit(k, unit, outs.pop(k), top, target, image, loss_fn, amp,
                                               optimizer=optimizer, clip_grad=clip_grad)
            if offload is not None:
                offload.done(k)
        losses.append(loss)
        accs.append(acc)
        del top
    streams.end()
    losses, accs = torch.stack(losses), torch.stack(accs)
    if sync:
        losses, accs = losses.tolist(), accs.tolist()
    return StepOutput(logits, losses[-1], losses[:-1], accs[:-1])


def _args(h: Bundle) -> tuple:
    return h if isinstance(h, tuple) else (h,)


def _tensors(h: Bundle) -> list[torch.Tensor]:
    return [t for t in _args(h) if isinstance(t, torch.Tensor)]
