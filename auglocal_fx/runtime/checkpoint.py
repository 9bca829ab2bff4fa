"""Checkpoint files: a converted net's weights and plan in one file, read without pickled code.

Only the file format lives here; rebuilding a net from a checkpoint is the compiler's job
(``compiler.load_auglocal``)."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..errors import AugLocalError

__all__ = ["FORMAT", "checksum", "save_net", "read_checkpoint", "read_shards", "shard_folder"]

FORMAT = "auglocal-fx/1"


def checksum(value, h=None) -> str:
    """SHA-256 over every tensor's bytes and every plain value, in a fixed order.

    Stored inside the file, so a flipped bit anywhere in the weights (which ``torch.load`` reads
    without complaint) is caught on load.
    """
    h = h or hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=repr):
            h.update(f"K{k!r}".encode())
            checksum(value[k], h)
    elif isinstance(value, list | tuple):
        h.update(f"L{len(value)}".encode())
        for v in value:
            checksum(v, h)
    else:
        h.update(f"V{value!r}".encode())
    return h.hexdigest()


def save_net(net, path: str | os.PathLike, extra: dict | None = None, weights: bool = True) -> None:
    """Write an AugLocalNet's plan, options, backbone and aux weights to ``path`` (atomic, checksummed).

    ``weights=False``: the weights live elsewhere, in the sharded folder ``extra["shards"]`` names
    (a pipeline's processes each wrote their own stage there); the file holds the rest.
    """
    payload = {
        "format": FORMAT,
        "plan": net.plan.to_dict(),
        "options": dict(net.options),
        "model_state": net.model.state_dict() if weights else None,
        "aux_state": net.aux.state_dict() if weights else None,
        **(extra or {}),
    }
    payload["sha256"] = checksum(payload)
    atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike, weights: bool = True) -> dict:
    """Load a checkpoint dict (tensors and plain data only), with one-line errors for bad files.

    A sharded checkpoint (a pipeline run's: the file names a folder of per-stage shards) is read
    whole into ``model_state`` and ``aux_state`` in this one process, unless ``weights=False``
    (a pipeline process resuming reads its own stage from the shards itself).
    """
    if os.path.isdir(path):
        held = sorted(p.name for p in Path(path).glob("*.pt"))
        hint = f"it holds {', '.join(held)}: pass one of them" if held else "pass a checkpoint file inside it"
        raise AugLocalError(f"checkpoint {path} is a folder; {hint}")
    if not os.path.isfile(path):
        raise AugLocalError(f"checkpoint {path} does not exist; write one with auglocal-convert --save")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        # a truncated zip, not a torch file, a pickle that weights_only refuses
        raise AugLocalError(f"checkpoint {path} is unreadable or corrupt ({type(exc).__name__}); "
                            "re-create it") from exc
    if isinstance(payload, dict) and "sha256" in payload:
        stored = payload.pop("sha256")
        if checksum(payload) != stored:
            raise AugLocalError(f"checkpoint {path} is corrupt (its contents do not match their SHA-256 "
                                "checksum); re-create it, or use another checkpoint (best.pt / last.pt)")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AugLocalError(f"{path} is not an auglocal-fx checkpoint (format {FORMAT}); pass a file written "
                            "by auglocal-train or auglocal-convert --save")
    if weights and payload.get("shards"):
        payload["model_state"], payload["aux_state"] = read_shards(shard_folder(path, payload),
                                                                   payload.get("weights", "model"))
    return payload


# -- sharded checkpoints (torch.distributed.checkpoint) ------------------------------------------------
# In a shard folder a weight is keyed as in the net: "model.<key>" / "aux.<key>", and the averaged
# weights of an EMA run as "ema.model.<key>" / "ema.aux.<key>"; each stage's optimizer, schedule and
# EMA states are one "stage<s>.state" blob.

def shard_folder(path: str | os.PathLike, payload: dict) -> Path:
    """The folder of shards a checkpoint file names (relative to the file's folder)."""
    folder = Path(path).parent / payload["shards"]
    if not (folder / ".metadata").is_file():
        raise AugLocalError(f"checkpoint {path} keeps its weights in {folder}, which is missing or incomplete; "
                            "copy the run folder whole (the .pt files and shards/), or use another checkpoint")
    return folder


def read_shards(folder: Path, which: str = "model") -> tuple[dict, dict]:
    """Every stage's weights from a shard folder, in one process: (model_state, aux_state).
    ``which="ema"``: the averaged weights (an EMA run's best.pt)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    found: dict = {}
    # what torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, kept in memory
    _load_state_dict(found, storage_reader=FileSystemReader(str(folder)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    lead = "ema." if which == "ema" else ""
    model = {k[len(lead) + 6:]: v for k, v in found.items() if k.startswith(lead + "model.")}
    aux = {k[len(lead) + 4:]: v for k, v in found.items() if k.startswith(lead + "aux.")}
    return model, aux
