"""Each local unit's whole training step as one CUDA graph: one launch per unit.

On a GPU a block-wise step is bound by issuing kernels, not by arithmetic: every unit runs a block,
an aux net of copied layers and a loss, forward and backward, and its optimizer update, and the
host issues each kernel. But a unit's step is static (the same shapes and kernels every batch), so
it can be recorded once and replayed with one launch (``torch.cuda.CUDAGraph``). Unit i's graph
holds its block's forward on a static input, the aux net's forward, the local loss, the backward,
gradient clipping and the unit's optimizer update with its gradients freed; unit i+1's graph reads
unit i's output where unit i's graph writes it. The graphs share one memory pool and are replayed
in the order they were captured (what sharing a pool requires).

What a capture needs, and is checked for: a CUDA device; the units' own optimizers
(``UnitOptimizers``) in an implementation that runs inside a graph (fused, or ``capturable=True``),
their learning rates held as float32 tensors on the device so an LR schedule reaches the replays
(done here; an update then differs from one with a Python float's rate in the rate's last bits);
autocast without its weight cache. The first ``warmup`` batches run eagerly on a side stream
(cuDNN's autotuning, the optimizers' lazily made state), the next one is captured and replayed; a
batch of another shape (the last, smaller one of an epoch) runs eagerly. Anything inside a unit
that needs the host mid-step (``.item()``, a branch on a tensor's value) cannot be captured: the
capture fails with a one-line error naming the unit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AugLocalError, first_line
from .blockwise import StepOutput, blockwise_step, unit_step
from .bundles import Bundle
from .unit_optim import UnitOptimizers

__all__ = ["CapturedStep"]


class CudaGraphs:
    """How unit steps are run and recorded on a CUDA device: warm-up on a side stream, capture into
    ``torch.cuda.CUDAGraph`` objects sharing one memory pool, replay on the current stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def check(self, optimizer: UnitOptimizers) -> None:
        for i, opt in enumerate(optimizer._all()):
            for g in opt.param_groups:
                # Adam and kin check `capturable` themselves; SGD has no such flag and captures fused
                if not (g["capturable"] if "capturable" in g else g.get("fused")):
                    flag = "capturable=True" if "capturable" in g else "fused=True"
                    raise AugLocalError(f"cuda graphs: the optimizer of unit {i} ({type(opt).__name__}) cannot run "
                                        f"inside a graph; build it with {flag}, e.g. net.unit_optimizers("
                                        f"torch.optim.{type(opt).__name__}, ..., {flag})")

    def eager(self, fn: Callable):
        """``fn()`` on the side stream (what torch asks of the steps before a capture)."""
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            out = fn()
        current.wait_stream(self.side)
        return out

    def capture(self, fn: Callable) -> tuple[Callable, object]:
        """Record ``fn()`` as a graph; returns ``(replay, fn's outputs)``: ``replay()`` runs the
        recorded kernels again and returns the same output tensors, now holding the new results."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may call CUDA while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()

        def replay():
            graph.replay()
            return out

        return replay, out


class CapturedStep:
    """``net.capture(...)``: a training step whose units replay as CUDA graphs; ``step(x, y)`` returns a
    ``StepOutput`` with losses as device tensors (as ``blockwise_step(sync=False)``).

    ``units``: the local units in order; ``optimizer``: their ``UnitOptimizers``; ``example``: a
    batch ``(x, y)`` of the shape to capture at (its values are not trained on). ``loss_fn``,
    ``autocast_dtype``, ``clip_grad``: as ``training_step``'s. ``log``: where the one-line notes go
    (the capture, a batch of another shape run eagerly).
    """

    def __init__(self, units: list[nn.Module], optimizer: UnitOptimizers, example: tuple, *, loss_fn=None,
                 autocast_dtype: torch.dtype | None = None, clip_grad: float | None = None, warmup: int = 3,
                 log: Callable[[str], None] = print, backend=None):
        x, y = example
        device = _device_of(x)
        if backend is None:
            if device.type != "cuda":
                raise AugLocalError(f"cuda graphs need a CUDA device, and the batch is on {device}; move the net and "
                                    "its data to a GPU (net.cuda()), or train without graphs")
            backend = CudaGraphs(device)
        if not isinstance(optimizer, UnitOptimizers) or len(optimizer.optimizers) != len(units):
            raise AugLocalError("cuda graphs capture each unit's optimizer update: pass the units' own optimizers, "
                                "net.unit_optimizers(torch.optim.SGD, lr=...)")
        if warmup < 1:
            raise AugLocalError(f"cuda graphs: warmup={warmup}; give at least 1 eager step before the capture "
                                "(cuDNN picks its kernels, the optimizers make their state)")
        for g in optimizer.param_groups:  # fused Adam(W) keeps its step count on the device already
            if g.get("fused") and g.get("capturable") is False:
                g["capturable"] = True
        backend_check = getattr(backend, "check", None)
        if backend_check is not None:
            backend_check(optimizer)
        self.units, self.optimizer, self.backend, self.log = units, optimizer, backend, log
        self.loss_fn, self.autocast_dtype, self.clip_grad, self.warmup = loss_fn or F.cross_entropy, \
            autocast_dtype, clip_grad, warmup
        self.shape = _signature(x, y)
        self._lr_on(device)
        self.calls, self.replays, self.eager_steps = 0, 0, 0
        self._graphs: list[Callable] | None = None
        self._other_shape_said = False

    def _lr_on(self, device: torch.device) -> None:
        """Each group's learning rate as a 0-d tensor on ``device``: a graph reads it where it lies, and
        LR schedulers write tensors in place (``fill_``)."""
        for g in self.optimizer.param_groups:
            if not isinstance(g["lr"], torch.Tensor):
                g["lr"] = torch.tensor(float(g["lr"]), device=device)

    def _amp(self):
        """Autocast without its cache of cast weights (a graph must not keep a cast made outside it)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.backend.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def __call__(self, x, y: torch.Tensor) -> StepOutput:
        self.calls += 1
        if _signature(x, y) != self.shape:
            if not self._other_shape_said:
                self.log(f"cuda graphs: a batch of {_describe(x)} (captured: {_describe_sig(self.shape)}) runs "
                         "eagerly; drop_last in the loader avoids it")
                self._other_shape_said = True
            self.eager_steps += 1
            return self.backend.eager(lambda: self._eager(x, y))
        if self._graphs is None and self.calls <= self.warmup:
            self.eager_steps += 1
            return self.backend.eager(lambda: self._eager(x, y))
        if self._graphs is None:
            self._capture(x, y)
        return self._replay(x, y)

    def _eager(self, x, y) -> StepOutput:
        return blockwise_step(self.units, x, y, self.loss_fn, self.autocast_dtype, optimizer=self.optimizer,
                              sync=False, clip_grad=self.clip_grad)

    def _capture(self, x, y) -> None:
        self.static_x = _clone(x)
        self.static_y = y.clone()
        self._inputs: list = [self.static_x]
        self._graphs, self._outs = [], []
        image = self.static_x[0] if isinstance(self.static_x, tuple) else self.static_x
        last = len(self.units) - 1
        for i, unit in enumerate(self.units):
            def body(i=i, unit=unit):
                return unit_step(i, unit, self._inputs[i], self.static_y, image, self.loss_fn, self._amp(),
                                 optimizer=self.optimizer, clip_grad=self.clip_grad)
            try:
                replay, out = self.backend.capture(body)
            except AugLocalError:
                raise
            except RuntimeError as exc:
                what = "the last block and the head" if i == last else f"block {i} and its aux net"
                raise AugLocalError(f"cuda graphs: unit {i} ({what}) cannot be captured: {first_line(exc, 160)}; "
                                    "something in it needs the host mid-step (.item(), a branch on a tensor's value); "
                                    "train without graphs, or make that module static") from exc
            self._graphs.append(replay)
            self._outs.append(out)
            if i < last:
                self._inputs.append(out[0])  # unit i+1 reads unit i's output where unit i's graph writes it
        self.log(f"cuda graphs: captured {len(self.units)} units at {_describe_sig(self.shape)}")

    def _replay(self, x, y) -> StepOutput:
        _copy_into(self.static_x, x)
        self.static_y.copy_(y, non_blocking=True)
        for i, replay in enumerate(self._graphs):
            out = replay()
            self._outs[i] = out
            if i + 1 < len(self._graphs):
                self._inputs[i + 1] = out[0]  # the same tensor on a GPU; a stand-in's new one
        self.replays += 1
        losses = torch.stack([o[1] for o in self._outs])  # copies: the next replay overwrites the graphs' own
        accs = torch.stack([o[2] for o in self._outs])
        return StepOutput(self._outs[-1][3].clone(), losses[-1], losses[:-1], accs[:-1])


def _device_of(x) -> torch.device:
    return (x[0] if isinstance(x, tuple | list) else x).device


def _signature(x, y) -> tuple:
    xs = x if isinstance(x, tuple | list) else (x,)
    return tuple((tuple(t.shape), t.dtype, t.is_contiguous(memory_format=torch.channels_last) and t.dim() == 4)
                 for t in (*xs, y))


def _describe(x) -> str:
    xs = x if isinstance(x, tuple | list) else (x,)
    return " + ".join("x".join(map(str, t.shape)) for t in xs)


def _describe_sig(sig: tuple) -> str:
    return " + ".join("x".join(map(str, shape)) for shape, _, _ in sig[:-1])


def _clone(x: Bundle) -> Bundle:
    """A static copy of the batch, in the batch's memory format (channels_last stays so)."""
    if isinstance(x, tuple | list):
        return tuple(_clone(t) for t in x)
    return x.clone(memory_format=torch.preserve_format)


def _copy_into(static: Bundle, x: Bundle) -> None:
    if isinstance(static, tuple):
        for s, t in zip(static, x):
            s.copy_(t, non_blocking=True)
    else:
        static.copy_(x, non_blocking=True)
