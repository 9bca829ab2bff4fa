"""Models by name through timm's registry (with helpful errors), and what a model says about itself."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import socket
import threading
from contextlib import contextmanager
from urllib.parse import urlparse

import timm
from torch import nn

from .errors import AugLocalError, first_line
from .hf_models import PREFIX, create_hf_model

__all__ = ["check_num_classes", "create_model", "default_input_size", "registered_name", "is_reference",
           "import_object", "call_with", "takes", "create_from_factory"]

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

    An unknown name raises AugLocalError listing the closest registered names. ``hf:...`` names a
    Hugging Face image classifier (``hf_models.py``).
    """
    if name.startswith(PREFIX):
        return create_hf_model(name[len(PREFIX):], pretrained=pretrained, num_classes=num_classes, **kwargs)
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


# -- your own code, named in a recipe or a checkpoint: "package.module:function" --------------------
_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_reference(value) -> bool:
    """Whether ``value`` reads as ``package.module:attribute`` (a name with a colon)."""
    return isinstance(value, str) and ":" in value


def import_object(ref: str, what: str):
    """The callable ``ref`` (``package.module:function``, or ``module:Class.method``) names, imported
    as ``python -c 'import package.module'`` would; one-line errors start with ``what`` (e.g.
    ``recipe key model.factory``). An exception raised while the module runs (a bug in it) is its own."""
    if not _REFERENCE.fullmatch(ref):
        raise AugLocalError(f"{what} {ref!r} is not package.module:function; give the module's import path, a "
                            "colon and the function's name, e.g. mypackage.models:make_net")
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AugLocalError(f"{what} {ref!r}: module {module_name} cannot be imported (no module named "
                                f"{exc.name!r}); check PYTHONPATH (PYTHONPATH=. for a module in the current folder) "
                                "or that its package is installed") from exc
        raise AugLocalError(f"{what} {ref!r}: importing {module_name} failed: it imports {exc.name!r}, which is not "
                            "installed; install it") from exc
    obj = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"did you mean {close[0]}?" if close else "check the name"
            raise AugLocalError(f"{what} {ref!r}: {owner} has no attribute {part!r}; {hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise AugLocalError(f"{what} {ref!r} is {_a(type(obj).__name__)}, not callable; name a function (or class)")
    return obj


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def takes(fn, name: str) -> bool:
    """Whether ``fn``'s signature names a parameter ``name`` (``**kwargs`` does not count)."""
    try:
        param = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False
    return param is not None and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)


def call_with(fn, kwargs: dict, what: str, ref: str, key: str):
    """``fn(**kwargs)``, after checking that its signature takes them (one line naming recipe key ``key``)."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no keywords"
        raise AugLocalError(f"{what} {ref!r} cannot be called with {given} ({exc}); give the keywords it takes in "
                            f"{key}") from exc
    except ValueError:  # no signature to read: call and see
        pass
    try:
        return fn(**kwargs)
    except AugLocalError:
        raise
    except Exception as exc:  # your code, run with your keywords: its error is yours to read, in one line
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no keywords"
        raise AugLocalError(f"{what} {ref!r} raised {first_line(exc, 200)} when called with {given}; fix {key} or "
                            "the function (call it in Python to see where)") from exc


def create_from_factory(ref: str, kwargs: dict, *, what: str = "recipe key model.factory",
                        key: str = "model.kwargs", optional: dict | None = None) -> nn.Module:
    """The model ``ref``'s callable returns for ``kwargs`` (plus the ``optional`` keywords its
    signature names, e.g. ``num_classes``); one-line errors for a reference that does not import, a
    name that is not there or not callable, keywords it does not take, and a result that is not an
    ``nn.Module``."""
    fn = import_object(ref, what)
    kwargs = {**{k: v for k, v in (optional or {}).items() if k not in kwargs and takes(fn, k)}, **kwargs}
    model = call_with(fn, kwargs, what, ref, key)
    if not isinstance(model, nn.Module):
        raise AugLocalError(f"{what} {ref!r} returned {_a(type(model).__name__)}, not an nn.Module; return the model")
    return model
