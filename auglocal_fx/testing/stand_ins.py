"""CPU stand-ins for the CUDA machinery of the GPU schedules, so their bookkeeping runs without a GPU.

Each takes the place of one CUDA helper and keeps its contract: ``GraphsStandIn`` of
``graphs.CudaGraphs`` (a capture records and computes nothing, a replay runs what was recorded),
``TransfersStandIn`` of ``offload.CudaTransfers`` (every fetch and write-back a real copy between two
CPU tensors, so each swap of storage is exercised), ``StreamsStandIn`` of ``overlap.CudaStreams``
(no concurrency; the order work is issued in is recorded). The tests and ``tools/bench_gpu.py
--dry-run`` use them; the real helpers run on a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["GraphsStandIn", "TransfersStandIn", "StreamsStandIn"]


class GraphsStandIn:
    device = torch.device("cpu")

    def __init__(self, fail_at: int | None = None):
        self.captured, self.fail_at = 0, fail_at  # fail_at: the capture that raises, as a host sync would

    def eager(self, fn):
        return fn()

    def capture(self, fn):
        if self.captured == self.fail_at:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        self.captured += 1
        return fn, (None, None, None, None)


class TransfersStandIn:
    def __init__(self):
        self.fetched = 0

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone()

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        self.fetched += 1
        return host.clone()

    def fence(self):
        return None

    def wait(self, event, tensors) -> None:
        pass

    def write_back(self, pairs) -> None:
        for host, dev in pairs:
            host.copy_(dev)

    def synchronize(self) -> None:
        pass


class StreamsStandIn:
    def __init__(self):
        self.order: list[int] = []  # the unit index of each stream context entered, in order

    def begin(self, tensors) -> None:
        pass

    def on(self, k: int):
        self.order.append(k)
        return nullcontext()

    def mark(self, k: int):
        return None

    def hand(self, event, tensors, k: int) -> None:
        pass

    def end(self) -> None:
        pass
