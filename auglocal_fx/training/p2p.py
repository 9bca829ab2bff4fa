"""Tensors between pipeline stages: ``torch.distributed`` point-to-point ``isend`` / ``irecv``.

A message is a list of tensors (a boundary's bundle, the labels, maybe the input batch). Their
shapes change with the batch (the last one may be smaller) and their dtypes with autocast, so each
message starts with a small fixed-size int64 header naming every tensor's dtype and shape; the
receiver allocates from it, then receives the tensors themselves. A bundle may also carry a size
(a Python int, e.g. the batch size a later reshape needs) or None: those travel in the header. Sends are asynchronous: the
sender keeps at most ``depth`` messages in flight (and their tensors alive) and waits for the
oldest before it goes further ahead, which bounds the memory a fast stage can fill while a slow
one catches up.
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

from ..errors import AugLocalError

__all__ = ["Sender", "recv_tensors", "MAX_TENSORS"]

MAX_TENSORS, MAX_DIMS = 16, 8
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool,
          torch.uint8, torch.int8, torch.int16)
_HEADER = 1 + MAX_TENSORS * (2 + MAX_DIMS)  # count, then per tensor: dtype code, ndim, dims
_INT, _NONE = 100, 101  # codes of the values that are not tensors (an int's value sits in the first dim)


def _header(tensors: list, device: torch.device) -> torch.Tensor:
    if len(tensors) > MAX_TENSORS:
        raise AugLocalError(f"a pipeline stage would send {len(tensors)} tensors at once, more than {MAX_TENSORS}; "
                            "lower conversion.max_bundle")
    h = torch.zeros(_HEADER, dtype=torch.int64)
    h[0] = len(tensors)
    for i, t in enumerate(tensors):
        at = 1 + i * (2 + MAX_DIMS)
        if t is None or (isinstance(t, int) and not isinstance(t, bool)):
            h[at], h[at + 2] = (_NONE, 0) if t is None else (_INT, t)
            continue
        if not isinstance(t, torch.Tensor):
            raise AugLocalError(f"a pipeline stage cannot send a {type(t).__name__} between blocks (tensors, ints "
                                "and None can travel); cut the model elsewhere (conversion.layers)")
        if t.dtype not in DTYPES or t.dim() > MAX_DIMS:
            raise AugLocalError(f"a pipeline stage cannot send a {t.dtype} tensor of {t.dim()} dimensions "
                                f"(dtypes: {', '.join(str(d) for d in DTYPES)}; at most {MAX_DIMS} dimensions)")
        h[at], h[at + 1] = DTYPES.index(t.dtype), t.dim()
        h[at + 2: at + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return h.to(device)


class Sender:
    """Asynchronous sends to global rank ``dst``, at most ``depth`` messages in flight."""

    def __init__(self, dst: int, device: torch.device, depth: int = 2):
        self.dst, self.device, self.depth = dst, device, depth
        self._flight: deque = deque()  # (works, tensors kept alive until sent)

    def send(self, tensors: list[torch.Tensor]) -> None:
        while len(self._flight) >= self.depth:
            self._wait_oldest()
        tensors = [_header(tensors, self.device), *(t.contiguous() for t in tensors if isinstance(t, torch.Tensor))]
        works = [dist.isend(t, self.dst) for t in tensors]
        self._flight.append((works, tensors))

    def _wait_oldest(self) -> None:
        works, _ = self._flight.popleft()
        for w in works:
            w.wait()
            while self.device.type == "cuda" and not w.is_completed():
                time.sleep(1e-4)  # NCCL's wait() only orders the stream: hold the host too, as the bound means

    def flush(self) -> None:
        """Wait until every message has left (before a checkpoint, or the end)."""
        while self._flight:
            self._wait_oldest()


def recv_tensors(src: int, device: torch.device) -> list[torch.Tensor]:
    """The next message from global rank ``src`` (blocking)."""
    h = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.recv(h, src)
    h = h.cpu().tolist()
    out = []
    for i in range(h[0]):
        at = 1 + i * (2 + MAX_DIMS)
        if h[at] in (_INT, _NONE):
            out.append(h[at + 2] if h[at] == _INT else None)
            continue
        shape = h[at + 2: at + 2 + h[at + 1]]
        out.append(torch.empty(shape, dtype=DTYPES[h[at]], device=device))
    works = [dist.irecv(t, src) for t in out if isinstance(t, torch.Tensor)]
    for w in works:
        w.wait()
    return out
