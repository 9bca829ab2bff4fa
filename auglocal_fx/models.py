"""Models by name through timm's registry (with helpful errors), and what a model says about itself."""

from __future__ import annotations

import difflib
import os
import socket
import threading
from contextlib import contextmanager
from urllib.parse import urlparse

import timm
from torch import nn

from .errors import AugLocalError, first_line

__all__ = ["check_num_classes", "create_model", "default_input_size", "registered_name"]

# How long a reachability probe of the weights' host may take: the Hugging Face client, offline,
# retries for about a minute before it gives up; a refused or unresolvable host answers at once.
PROBE_TIMEOUT_S = 2.0


def check_num_classes(num_classes, param: str = "num_classes") -> None:
    """Refuse a class count below 1 (``None``: the model's own).

    timm builds a model *without* its classifier for ``num_classes=0`` (a feature extractor), and
    the converted net would silently treat its pooled features as logits. One class is allowed: a
    single logit trained with a custom ``loss_fn`` (binary cross-entropy) is a real use.
    """
    if num_classes is None:
        return
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise AugLocalError.bad_value(
            param, num_classes, "is not an integer >= 1: with 0 timm drops the classifier and its features "
                                "would be taken as logits; give the number of classes")


def create_model(name: str, *, pretrained: bool = False, num_classes: int | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with random weights by default (works offline).

    An unknown name raises AugLocalError listing the closest registered names.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "list names with timm.list_models('*pattern*')"
        raise AugLocalError(f"unknown model {name!r}: {hint}")
    check_num_classes(num_classes)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if not pretrained:
        try:
            return timm.create_model(name, **kwargs)
        except TypeError as exc:  # a keyword the architecture does not take
            raise AugLocalError(f"{name} cannot be made with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())} "
                                f"({first_line(exc, 160, with_type=False)}); drop the keyword it does not take") from exc
        except (RuntimeError, FileNotFoundError) as exc:  # checkpoint_path: weights of another architecture
            if "can't allocate memory" in str(exc):  # e.g. num_classes=10**9: a classifier of terabytes
                raise AugLocalError(f"{name} with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())} does not fit "
                                    f"in memory ({first_line(exc, 200, with_type=False).split('DefaultCPUAllocator: ')[-1]}); "
                                    "give smaller settings (num_classes, img_size)") from exc
            if "checkpoint_path" not in kwargs:
                raise
            raise AugLocalError(f"the weights in {kwargs['checkpoint_path']} do not load into {name} "
                                f"({first_line(exc, 160, with_type=False)}); give weights of that architecture") from exc
    offline = _why_offline()
    try:
        # offline, read only the local cache: weights downloaded before still load, and a miss fails
        # in a second instead of after the hub client's minute of retries
        with _hub_offline(offline is not None):
            return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as exc:
        if offline is not None:
            raise AugLocalError(
                f"pretrained weights for {name!r} are not in the local cache and {offline}; connect to the "
                "network once to download them, or use random weights") from exc
        raise AugLocalError(
            f"could not load pretrained weights for {name!r} ({type(exc).__name__}); "
            "check the network, or use random weights") from exc


def _hub_address() -> tuple[str, int]:
    """Host and port of the Hugging Face hub, or of the mirror ``HF_ENDPOINT`` names."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _why_offline() -> str | None:
    """Why the weights cannot be downloaded now (``HF_HUB_OFFLINE`` is set, or the hub does not
    answer a TCP connect within ``PROBE_TIMEOUT_S``); None when the hub may be reachable."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return None if _hub_reachable() else f"{_hub_address()[0]} cannot be reached (no network)"


def _hub_reachable() -> bool:
    """Whether the Hugging Face hub answers a TCP connect within ``PROBE_TIMEOUT_S``.

    Behind a proxy a direct connect proves nothing, so the client is left to try. The probe runs in
    a thread because name resolution ignores socket timeouts.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(_hub_address(), timeout=PROBE_TIMEOUT_S).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return bool(answered)


@contextmanager
def _hub_offline(offline: bool):
    """The Hugging Face client in offline mode (cache only) while inside, when ``offline``.

    ``HF_HUB_OFFLINE`` is read once at import, so the switch is the constant the client consults.
    """
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """timm's ``pretrained_cfg['input_size']`` when present, else (3, 224, 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def registered_name(model: nn.Module) -> str:
    """timm's registered name (``pretrained_cfg['architecture']``) when known, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__
