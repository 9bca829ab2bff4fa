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

__all__ = ["FORMAT", "checksum", "save_net", "read_checkpoint"]

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


def save_net(net, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write an AugLocalNet's plan, options, backbone and aux weights to ``path`` (atomic, checksummed)."""
    payload = {
        "format": FORMAT,
        "plan": net.plan.to_dict(),
        "options": dict(net.options),
        "model_state": net.model.state_dict(),
        "aux_state": net.aux.state_dict(),
        **(extra or {}),
    }
    payload["sha256"] = checksum(payload)
    atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict (tensors and plain data only), with one-line errors for bad files."""
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
    return payload
