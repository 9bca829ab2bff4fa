"""Aux nets off the card while they do not train (``offload: aux``).

The method's aux nets can hold several times the backbone's parameters (resnet50 K=16: 155.6M
beside 25.6M), and with their optimizer state they sit on the device for the whole step though only
one unit trains at a time. ``AuxOffload`` keeps every aux net's weights, buffers and optimizer state
in pinned host memory, except the aux net of the unit training now and of the next one: before unit
i runs, aux net i+1 is copied in on a side stream (its copy overlaps unit i's compute); after unit
i's update, aux net i is copied back to the host on that stream and its device memory handed back.
The backbone and the head stay on the device.

Exact by construction: the same kernels run on the same values; only where the tensors live between
units changes. The tensors keep their identity (``.data`` is swapped), so optimizers, schedulers and
checkpoints see the same parameters. On the host side the weights are final once ``synchronize()``
returned (checkpoints and evaluation call it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import AugLocalError
from .unit_optim import UnitOptimizers

__all__ = ["AuxOffload", "CudaTransfers"]


class CudaTransfers:
    """Host <-> device copies on a side stream of ``device``, into and out of pinned host memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        host = torch.empty_like(t, device="cpu", pin_memory=True)  # strides kept (channels_last weights)
        host.copy_(t)
        return host

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        with torch.cuda.stream(self.stream):
            return host.to(self.device, non_blocking=True)

    def fence(self):
        """An event after the copies queued so far."""
        return self.stream.record_event()

    def wait(self, event, tensors: list[torch.Tensor]) -> None:
        """The compute stream waits for ``event``; ``tensors`` (made on the copy stream) are used there."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for t in tensors:
            t.record_stream(compute)

    def write_back(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``host.copy_(dev)`` for each pair, after the compute stream's work so far; the device
        tensors are not reused before the copies are done."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for host, dev in pairs:
                host.copy_(dev, non_blocking=True)
                dev.record_stream(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class AuxOffload:
    """Aux nets ``0..M-2`` of ``units`` (each unit's ``top`` but the last's, the head) held on the host
    but for the unit that trains and the next. ``blockwise_step(offload=...)`` calls ``ready(i)``
    before unit i and ``done(i)`` after its update; ``resident()`` brings every aux net in for
    evaluation. ``optimizer``: the units' ``UnitOptimizers``, whose state for the aux nets moves with
    their weights. ``transfers``: how tensors move (``CudaTransfers`` on ``device``; tests pass a
    stand-in)."""

    def __init__(self, units: list[nn.Module], optimizer: UnitOptimizers, device: torch.device | None = None,
                 transfers=None):
        units = [getattr(u, "module", u) for u in units]
        if transfers is None:
            if device is None or device.type != "cuda":
                raise AugLocalError(f"offload: aux keeps the aux nets in host memory beside a CUDA device, and the net is "
                                    f"on {device}; move it to a GPU (net.cuda()), or train without offload")
            transfers = CudaTransfers(device)
        if not isinstance(optimizer, UnitOptimizers):
            raise AugLocalError("offload: aux moves each aux net's optimizer state with it: pass the units' own "
                                "optimizers, net.unit_optimizers(torch.optim.SGD, lr=...)")
        self.transfers, self.optimizer = transfers, optimizer
        kept = {id(t) for u in units for m in (u.block, units[-1].top) for t in (*m.parameters(), *m.buffers())}
        # per aux net: its tensors that no block or head shares (a shared one stays on the device)
        self.tensors: list[list[torch.Tensor]] = []
        for u in units[:-1]:
            seen, own = set(), []
            for t in (*u.top.parameters(), *u.top.buffers()):
                if id(t) not in kept and id(t) not in seen:
                    seen.add(id(t))
                    own.append(t)
            self.tensors.append(own)
        self.host = [[transfers.host_copy(t.data) for t in ts] for ts in self.tensors]
        owner = {id(p): o for o in optimizer._all() for g in o.param_groups for p in g["params"]}
        # per aux net, the optimizer-state dicts of its parameters (the state itself appears at the first update)
        self.states = [[(j, owner[id(t)].state[t]) for j, t in enumerate(ts) if id(t) in owner] for ts in self.tensors]
        self.state_host: list[dict] = [{} for _ in self.tensors]  # (tensor index, state name) -> host copy
        self.on_device: dict[int, tuple[list[torch.Tensor], object]] = {}  # aux net -> (device tensors, event)
        for k in range(self.count):
            self._new_state_on_host(k)  # a resumed run's loaded state
            self._to_host(k)

    def check_optimizer(self, optimizer) -> None:
        """A step with this offload steps the optimizer it was made with: the aux nets go back to the
        host after their update, their optimizer state with them."""
        if optimizer is None or optimizer is not self.optimizer:
            raise AugLocalError("training_step(offload=...): the aux nets go back to the host after their update; "
                                "pass the optimizer the offload was made with (optimizer=...)")

    @property
    def count(self) -> int:
        return len(self.tensors)

    # -- the step ------------------------------------------------------------------------------
    def ready(self, i: int) -> None:
        """Before unit ``i``: its aux net on the device (waited for), the next one's copy started."""
        if i >= self.count:
            return
        self._fetch(i)
        tensors, event = self.on_device[i]
        self.transfers.wait(event, tensors)
        if i + 1 < self.count:
            self._fetch(i + 1)

    def done(self, i: int) -> None:
        """After unit ``i``'s update: its aux net (weights, buffers, optimizer state) back to the host;
        the first aux net's copy for the next step started."""
        if i >= self.count:
            return
        dev, _ = self.on_device.pop(i)
        self._new_state_on_host(i)  # what its first update made: copied now, once
        pairs = list(zip(self.host[i], dev))
        pairs += [(h, state[name]) for j, state in self.states[i] for (jj, name), h in self.state_host[i].items()
                  if jj == j and state[name] is not h]
        self.transfers.write_back(pairs)
        self._to_host(i)
        if i == self.count - 1 and self.count > 1:
            self._fetch(0)  # overlaps the rest of this step

    def synchronize(self) -> None:
        """The host copies hold the weights of every finished update (before reading them on the CPU)."""
        self.transfers.synchronize()

    def settle(self) -> None:
        """Between steps: every aux net in its host copy, which holds its last update (a prefetched copy,
        not yet trained on, is let go): before the aux nets' weights are read or loaded."""
        self.synchronize()
        for k in list(self.on_device):
            self.on_device.pop(k)
            self._to_host(k)

    @contextmanager
    def resident(self) -> Iterator[None]:
        """Every aux net on the device (evaluation of every aux head); back to the host after, unchanged."""
        for k in range(self.count):
            self._fetch(k)
        for k in range(self.count):
            self.transfers.wait(self.on_device[k][1], self.on_device[k][0])
        try:
            yield
        finally:
            for k in range(self.count):
                self.on_device.pop(k)
                self._to_host(k)

    # -- moving one aux net ----------------------------------------------------------------------
    def _fetch(self, k: int) -> None:
        if k in self.on_device:
            return
        dev = [self.transfers.to_device(h) for h in self.host[k]]
        for j, state in self.states[k]:
            for (jj, name), h in self.state_host[k].items():
                if jj == j:
                    state[name] = self.transfers.to_device(h)
        self.on_device[k] = (dev, self.transfers.fence())
        for t, d in zip(self.tensors[k], dev):
            t.data = d

    def _to_host(self, k: int) -> None:
        """Aux net ``k``'s tensors and optimizer state point at their host copies (the copies the
        write-back fills)."""
        for t, h in zip(self.tensors[k], self.host[k]):
            t.data = h
        for j, state in self.states[k]:
            for (jj, name), h in self.state_host[k].items():
                if jj == j:
                    state[name] = h

    def _new_state_on_host(self, k: int) -> None:
        """Optimizer state of aux net ``k`` that has no host copy yet (made by its first update, or
        loaded from a checkpoint) gets one, synchronously. Only per-element state moves (momentum,
        Adam's moments); a step count stays where the optimizer keeps it."""
        for j, state in self.states[k]:
            for name, value in state.items():
                if (j, name) not in self.state_host[k] and isinstance(value, torch.Tensor) \
                        and value.shape == self.tensors[k][j].shape:
                    self.state_host[k][(j, name)] = self.transfers.host_copy(value)
