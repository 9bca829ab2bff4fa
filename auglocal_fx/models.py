"""Resolve a model name to an ``nn.Module`` through timm's registry, with helpful errors."""

from __future__ import annotations

import difflib

from torch import nn

from .errors import AugLocalError

__all__ = ["create_model"]


def create_model(name: str, *, pretrained: bool = False, num_classes: int | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with random weights by default (works offline).

    An unknown name raises AugLocalError listing the closest registered names.
    """
    import timm  # noqa: PLC0415  (heavy import, only when a name is resolved)

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
                "check the network or drop --pretrained") from None
        raise
