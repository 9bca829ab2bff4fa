"""Training checkpoints: the converted net plus everything needed to continue exactly where it stopped.

A checkpoint is an ``auglocal-fx/1`` file (``load_auglocal`` and ``auglocal-export`` read it) with a
``train`` entry: epoch, optimizer, scheduler, RNG states, metrics history, best accuracy and the
recipe. All of it is tensors and plain data, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from ..errors import AugLocalError
from ..runtime.checkpoint import read_checkpoint, save_net

__all__ = ["rng_state", "set_rng_state", "save_training", "copy_checkpoint", "read_training"]


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    # random.setstate wants the tuples it gave; a round trip may hand back lists
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def save_training(net, path: str | Path, train: dict, model_kwargs: dict, shards: str | None = None,
                  weights: str = "model") -> None:
    """Write ``net`` and the training state atomically (temp file + rename). ``weights``: which weights
    the file's net is, the trained ones ("model") or their averages ("ema": a best.pt under
    ema_decay, which a run does not resume from); ``shards``: they are in that shard folder (relative
    to the file's), not in the file."""
    net.options["model_kwargs"] = dict(model_kwargs)  # how load_auglocal re-creates the model
    extra = {"train": train, "weights": weights}
    if shards is None:
        save_net(net, path, extra=extra)
    else:
        save_net(net, path, extra={**extra, "shards": shards}, weights=False)


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """``dst`` becomes a copy of ``src``, atomically (``best`` from ``last``)."""
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out))


def read_training(path: str | Path, weights: bool = True) -> dict:
    """A checkpoint written by ``auglocal-train`` (one-line errors for anything else); ``weights=False``
    leaves a sharded checkpoint's weights in its shards."""
    if not Path(path).exists():
        raise AugLocalError(f"cannot resume from {path}: no such file; give a run's last.pt, or resume the run in the "
                            "recipe's output folder with --resume auto")
    payload = read_checkpoint(path, weights=weights)
    if "train" not in payload:
        raise AugLocalError(f"{path} holds no training state (written by auglocal-convert?); "
                            "start a new run without --resume")
    return payload
