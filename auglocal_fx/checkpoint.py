"""Save and load a converted net: weights and plan in one file, loaded without pickled code."""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from .errors import AugLocalError
from .io import atomic_write
from .plan import Plan

__all__ = ["FORMAT", "save_net", "load_auglocal", "read_checkpoint"]

FORMAT = "auglocal-fx/1"


def _digest(value, h=None) -> str:
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
            _digest(value[k], h)
    elif isinstance(value, list | tuple):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _digest(v, h)
    else:
        h.update(f"V{value!r}".encode())
    return h.hexdigest()


def save_net(net, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``net``'s plan, options, backbone and aux weights to ``path`` (atomic, checksummed)."""
    payload = {
        "format": FORMAT,
        "plan": net.plan.to_dict(),
        "options": dict(net.options),
        "model_state": net.model.state_dict(),
        "aux_state": net.aux.state_dict(),
        **(extra or {}),
    }
    payload["sha256"] = _digest(payload)
    atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict (tensors and plain data only), with one-line errors for bad files."""
    if not os.path.isfile(path):
        raise AugLocalError(f"checkpoint {path} does not exist; write one with auglocal-convert --save")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, unpickling refused
        raise AugLocalError(f"checkpoint {path} is unreadable or corrupt ({type(exc).__name__}); "
                            "re-create it") from None
    if isinstance(payload, dict) and "sha256" in payload:
        stored = payload.pop("sha256")
        if _digest(payload) != stored:
            raise AugLocalError(f"checkpoint {path} is corrupt (its contents do not match their SHA-256 "
                                "checksum); re-create it, or use another checkpoint (best.pt / last.pt)")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AugLocalError(f"{path} is not an auglocal-fx checkpoint (format {FORMAT}); pass a file written "
                            "by auglocal-train or auglocal-convert --save")
    return payload


def load_auglocal(path: str | os.PathLike, model: nn.Module | None = None, **create_kwargs):
    """Rebuild the net saved at ``path``. For a timm model the architecture is re-created by name
    (``create_kwargs`` go to ``timm.create_model`` too, e.g. ``exportable=True``); otherwise pass a
    freshly constructed ``model`` of the same architecture.

    Example:
        >>> net.save("converted.pt")
        >>> net2 = load_auglocal("converted.pt")
    """
    from .convert import to_auglocal  # noqa: PLC0415  (import cycle)
    from .models import create_model  # noqa: PLC0415

    payload = read_checkpoint(path)
    plan = Plan.from_dict(payload["plan"])
    options = payload.get("options", {})
    if model is None:
        c = plan.config
        # auglocal-train records the timm kwargs it used (img_size, norm_layer, ...)
        kwargs = options.get("model_kwargs") or {"num_classes": plan.head.out_shape[-1],
                                                 "in_chans": c.input_size[0]}
        try:
            model = create_model(c.model, **kwargs, **create_kwargs)
        except AugLocalError:
            raise AugLocalError(f"{c.model!r} is not a timm model: pass model= with the architecture "
                                f"to load {path}") from None
    net = to_auglocal(model, plan=plan, aux_init="copy", rule=options.get("rule", plan.config.rule))
    net.options.update(options)
    try:
        net.model.load_state_dict(payload["model_state"])
        net.aux.load_state_dict(payload["aux_state"])
    except RuntimeError as exc:  # load_state_dict lists the offending keys after a header line
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))[:160]
        raise AugLocalError(f"{path} holds weights for another model than {plan.config.model} ({detail}); "
                            "load it with the model it was saved from") from None
    return net
