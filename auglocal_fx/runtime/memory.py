"""Memory on any device: bytes of tensors saved for backward that are alive at once
(``SavedTensorMeter``), and the allocator's peak over a piece of code (``allocated_peak``).

Each saved tensor is counted once per storage (views share storage) from the moment autograd
saves it until the graph that holds it is freed; ``peak`` is the maximum over the measured code.
Storages passed as ``exclude`` (a model's parameters: a conv saves its weight) are left out of
``peak`` — they are resident whatever the training rule — and counted in ``peak_all`` only.
"""

from __future__ import annotations

import torch

__all__ = ["peak_rss_bytes", "SavedTensorMeter", "allocated_peak", "storage_key"]


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

    def __init__(self, exclude=(), exclude_keys=()):
        self.current = self.peak = 0  # without excluded storages
        self.current_all = self.peak_all = 0  # everything saved
        self._excluded = {storage_key(t) for t in exclude} | set(exclude_keys)  # keys: ``storage_key``
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


def allocated_peak(fn, device: str = "cpu") -> int:
    """Peak bytes live in PyTorch's allocator while ``fn()`` runs, beyond what was live before.

    On a GPU, ``torch.cuda.max_memory_allocated``. On CPU, the running total the profiler records
    with every allocation (``torch.profiler`` with ``profile_memory=True``; it counts only what is
    allocated while it runs). Unlike ``SavedTensorMeter`` it sees everything: gradients in flight,
    optimizer state, workspace, and tensors ``torch.utils.checkpoint`` recomputes (which it keeps
    out of the saved-tensor hooks).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes: ``VmHWM`` of its own address space on Linux.

    ``getrusage``'s ``ru_maxrss`` survives ``exec``: a process started from a large one (a benchmark
    or pytest that imported torch, forking its runs) reports at least its parent's size, so every
    child of a 1.4 GiB parent read 1.4 GiB. ``VmHWM`` starts anew with the exec'd program. Elsewhere
    (macOS: bytes; other Unixes: KiB) ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
