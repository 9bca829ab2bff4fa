"""Data parallelism under ``torchrun``: one DistributedDataParallel per gradient-isolated unit.

Local learning runs one backward per block, and each block's backward touches only that block's
(and its aux net's) parameters. Wrapping the whole net in one DDP would expect a single backward
over all parameters; instead each ``LocalUnit`` (block + aux net, or last block + head) gets its
own DDP, whose reducer averages that unit's gradients during that unit's backward — while the
next block has not started, so no gradient is reduced twice or missed.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import AugLocalError

__all__ = ["Env", "setup", "teardown", "barrier", "wrap_units", "gather_states", "to_bytes", "from_bytes"]


@dataclass(frozen=True)
class Env:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise AugLocalError("recipe key device is cuda but no CUDA device is visible; set device: cpu")
    if pref == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(device_pref: str = "auto") -> Env:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = _device(device_pref, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(rank, world, device)


def teardown(env: Env) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: Env) -> None:
    """Wait for every process (nothing to wait for in one)."""
    if env.distributed:
        dist.barrier()


def wrap_units(units: list, env: Env, group=None, size: int | None = None) -> list:
    """Each unit in its own DDP (parameters broadcast from the group's first rank); unchanged in one
    process. ``group`` (of ``size`` processes): the data-parallel group, default every process."""
    if (env.world if size is None else size) <= 1:
        return units
    ids = [env.device.index] if env.device.type == "cuda" else None
    return [DistributedDataParallel(u, device_ids=ids, process_group=group) for u in units]


def gather_states(state: dict, env: Env) -> list[dict]:
    """Every rank's ``state`` (tensors and plain data), in rank order, on every rank.

    Sent as ``torch.save`` bytes: ``all_gather_object`` pickles tensors by storage, which the
    receiving side cannot unpickle in recent PyTorch.
    """
    if not env.distributed:
        return [state]
    gathered = [None] * env.world
    dist.all_gather_object(gathered, to_bytes(state))
    return [from_bytes(b) for b in gathered]


def to_bytes(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def from_bytes(data: bytes):
    """Loaded on the CPU: a GPU rank's tensors must not land on rank 0's view of that device."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
