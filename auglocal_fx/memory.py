"""Activation memory on any device: bytes of tensors saved for backward that are alive at once.

Each saved tensor is counted once per storage (views share storage) from the moment autograd
saves it until the graph that holds it is freed; ``peak`` is the maximum over the measured code.
Storages passed as ``exclude`` (a model's parameters: a conv saves its weight) are left out of
``peak`` — they are resident whatever the training rule — and counted in ``peak_all`` only.
"""

from __future__ import annotations

import torch

__all__ = ["SavedTensorMeter", "storage_key"]


def storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage, shared by all its views. The address of the storage object
    itself, not of its data: fake tensors' storages (the profiler's) have no data (``data_ptr`` 0)."""
    return t.untyped_storage()._cdata


class _Handle:
    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Context manager measuring peak saved-for-backward bytes, deduplicated by storage.

    Example:
        >>> with SavedTensorMeter(exclude=model.parameters()) as meter:
        ...     model(x).sum().backward()
        >>> meter.peak, meter.peak_all  # bytes: activations only; with saved weights too
    """

    def __init__(self, exclude=()):
        self.current = self.peak = 0  # without excluded storages
        self.current_all = self.peak_all = 0  # everything saved
        self._excluded = {storage_key(t) for t in exclude}
        self._refs: dict[int, list[int]] = {}  # storage key -> [refcount, nbytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        try:
            key, nbytes = storage_key(t), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        ref = self._refs.get(key)
        if ref is None:
            self._refs[key] = [1, nbytes]
            self._add(key, nbytes)
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
            self._add(key, -ref[1])
            del self._refs[key]

    def _add(self, key: int, nbytes: int) -> None:
        self.current_all += nbytes
        self.peak_all = max(self.peak_all, self.current_all)
        if key not in self._excluded:
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False
