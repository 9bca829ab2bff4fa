"""Models by name through timm's registry (with helpful errors), and what a model says about itself."""

from __future__ import annotations

import difflib

import timm
from torch import nn

from .errors import AugLocalError

__all__ = ["create_model", "default_input_size", "registered_name"]


def create_model(name: str, *, pretrained: bool = False, num_classes: int | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with random weights by default (works offline).

    An unknown name raises AugLocalError listing the closest registered names.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "list names with timm.list_models('*pattern*')"
        raise AugLocalError(f"unknown model {name!r}: {hint}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise AugLocalError(
                f"could not load pretrained weights for {name!r} ({type(exc).__name__}); "
                "check the network, or use random weights (pretrained=False)") from exc
        raise


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """timm's ``pretrained_cfg['input_size']`` when present, else (3, 224, 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def registered_name(model: nn.Module) -> str:
    """timm's registered name (``pretrained_cfg['architecture']``) when known, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__
