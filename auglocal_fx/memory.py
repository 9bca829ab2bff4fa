"""Activation memory on any device: bytes of tensors saved for backward that are alive at once.

Each saved tensor is counted once per storage (views share storage) from the moment autograd
saves it until the graph that holds it is freed; ``peak`` is the maximum over the measured code.
"""

from __future__ import annotations

import torch

__all__ = ["SavedTensorMeter"]


class _Handle:
    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Context manager measuring peak saved-for-backward bytes, deduplicated by storage.

    Example:
        >>> with SavedTensorMeter() as meter:
        ...     model(x).sum().backward()
        >>> meter.peak  # bytes
    """

    def __init__(self):
        self.current = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [refcount, nbytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        ref = self._refs.get(key)
        if ref is None:
            self._refs[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            ref[0] += 1
        return _Handle(t, key, self)

    @staticmethod
    def _unpack(h):
        return h.tensor if isinstance(h, _Handle) else h

    def _release(self, key: int) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.current -= ref[1]
            del self._refs[key]

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False
