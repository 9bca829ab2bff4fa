"""How a freshly built aux net's weights start (``aux_init``): as the model initialises itself
(``model``, the default), as PyTorch builds a new layer (``fresh``), or as the backbone now is (``copy``).

``model``: an aux net's copied layers take the weights of a freshly constructed instance of the
same timm model (``timm.create_model`` with the architecture and the keywords that shape it), so
each family's own init applies: zero last-BN gammas in ResNet bottlenecks, trunc-normal std 0.02
linears in ViTs, and so on. Each copied parameter is taken from the fresh model's parameter of the
same qualified name (a copied graph piece keeps the model's module paths). The fresh instance is
built once per conversion, on the CPU (timm's init must run, so not on the meta device), and
before anything else in ``to_auglocal`` draws random numbers: under ``torch.manual_seed(s)`` the
copies hold exactly what ``timm.create_model`` gives after ``torch.manual_seed(s)``.

Everything else falls back to ``default_init``: layers no copy covers (adapters, small heads,
DGL's aux nets), and every layer of a model that is not timm's or cannot be re-created with the
backbone's parameter shapes. That scheme is what the reference code and torchvision's ResNets do:
convs kaiming-normal fan-out (ReLU gain) with zero bias; norms weight 1, bias 0, fresh running
statistics; linears trunc-normal std 0.02 with zero bias where the fresh timm model's own linears
all start that way (ViTs, MLP mixers), else PyTorch's default; any other module with a
``reset_parameters`` calls it. Parameters no module re-initialises (a class token held by a graph
piece of a non-timm model) keep the backbone's values, as with ``fresh``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from torch import nn

from ..errors import AugLocalWarning
from ..registry import Registry
from .emit import DualModeGraph

__all__ = ["AUX_INITS", "AuxInit", "default_init", "model_init", "recreate_model", "reset_parameters"]

Init = Callable[[nn.Module], nn.Module]  # initialises one aux net in place and returns it


@dataclass(frozen=True)
class AuxInit:
    """An aux init: ``prepare(model, model_kwargs)`` runs once per conversion and returns the
    function that initialises each aux net."""

    name: str
    summary: str  # one line, for --help and the docs
    prepare: Callable[[nn.Module, dict | None], Init]


AUX_INITS: Registry[AuxInit] = Registry("aux_init", "an aux init")


def reset_parameters(module: nn.Module) -> nn.Module:
    """Re-initialise every submodule that knows how (``reset_parameters``), as a fresh layer would be."""
    for m in module.modules():
        fn = getattr(m, "reset_parameters", None)
        if callable(fn) and m is not module:
            fn()
    return module


def default_init(module: nn.Module, trunc_normal_linears: bool = False) -> None:
    """Initialise ``module`` itself (not its children) by the fallback scheme (module docstring)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear) and trunc_normal_linears:
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif callable(getattr(module, "reset_parameters", None)) and not isinstance(module, DualModeGraph):
        module.reset_parameters()  # norms: 1 / 0 and fresh statistics; linears: PyTorch's default


def recreate_model(model: nn.Module, model_kwargs: dict | None = None) -> nn.Module | None:
    """A freshly constructed instance of timm model ``model`` with the same parameter shapes, or
    None (not a timm model, or no candidate keywords give the backbone's shapes).

    ``model_kwargs`` are the keywords ``model`` was created with (``auglocal-train`` passes its
    own); by default they are read off the model: ``num_classes``, the stem's input channels and,
    for patch-embedding models, ``img_size``.
    """
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch or not timm.is_model(arch):
        return None
    shapes = _shapes(model)
    for kwargs in ([model_kwargs] if model_kwargs is not None else _derived_kwargs(model)):
        try:
            fresh = timm.create_model(arch, pretrained=False, **kwargs)
        except Exception:  # noqa: BLE001 - a keyword this family does not take: try the next candidate
            continue
        if _shapes(fresh) == shapes:
            return fresh
    return None


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: t.shape for n, t in model.state_dict().items()}


def _derived_kwargs(model: nn.Module) -> list[dict]:
    """Candidate ``timm.create_model`` keywords for ``model``, most specific first."""
    base: dict = {}
    if isinstance(getattr(model, "num_classes", None), int):
        base["num_classes"] = model.num_classes
    stem = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)), None)
    if isinstance(stem, nn.modules.conv._ConvNd):
        base["in_chans"] = stem.in_channels
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None:
        return [base]
    return [{**base, "img_size": tuple(img_size)}, base]


def model_init(model: nn.Module, model_kwargs: dict | None = None) -> Init:
    """``aux_init="model"``: copies from a fresh instance of ``model``, the rest by ``default_init``."""
    fresh = recreate_model(model, model_kwargs)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if fresh is None and arch:
        warnings.warn(f"aux_init='model': {arch} could not be re-created with the backbone's parameter shapes "
                      "(pass model_kwargs= with the keywords it was built with); its aux nets use the fallback "
                      "init (kaiming-normal convs, norms 1/0)", AugLocalWarning, stacklevel=3)
    source: dict[str, torch.Tensor] = {}
    trunc = False
    if fresh is not None:
        source = {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}
        linears = [m.weight.detach() for m in fresh.modules() if isinstance(m, nn.Linear)]
        trunc = bool(linears) and all(map(_normal_std_002, linears))

    def init(aux: nn.Module) -> nn.Module:
        covered: set[int] = set()
        with torch.no_grad():
            for piece in (m for m in aux.modules() if isinstance(m, DualModeGraph)):
                for graph in (piece.train_graph, piece.eval_graph):
                    for prefix, m in (graph.named_modules() if graph is not None else ()):
                        if id(m) in covered:
                            continue
                        covered.add(id(m))
                        if not _take(m, prefix, source):
                            default_init(m, trunc)
                covered.add(id(piece))
            for m in aux.modules():
                if id(m) not in covered:
                    default_init(m, trunc)
        return aux

    return init


def _normal_std_002(w: torch.Tensor) -> bool:
    """Whether ``w`` looks drawn from a normal of std 0.02 (timm's ViT-style linears) rather than
    PyTorch's default uniform, whose std can be as close (1/sqrt(3 fan_in): 0.024 at fan_in 576):
    a uniform's excess kurtosis is -1.2, a normal's 0."""
    w = w.flatten().double()
    if w.numel() < 64:
        return False
    std = float(w.std())
    kurtosis = float(((w - w.mean()) ** 4).mean()) / std ** 4 - 3.0
    return 0.015 <= std <= 0.025 and kurtosis > -0.6


def _take(module: nn.Module, prefix: str, source: dict[str, torch.Tensor]) -> bool:
    """Copy ``module``'s own parameters and buffers from ``source`` by qualified name; False when
    one of them has no same-shaped counterpart there (then nothing is copied)."""
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    pairs = [(t, source.get(f"{prefix}.{n}" if prefix else n)) for n, t in own]
    if any(s is None or s.shape != t.shape for t, s in pairs):
        return False
    for t, s in pairs:
        t.copy_(s)
    return True


AUX_INITS.register("model", AuxInit("model", "as the model initialises itself: copies from a fresh timm instance, "
                                    "else kaiming-normal convs and norms 1/0", model_init))
AUX_INITS.register("fresh", AuxInit("fresh", "PyTorch's reset_parameters on every layer (new layers, as the "
                                    "paper's code builds them)", lambda model, kwargs: reset_parameters))
AUX_INITS.register("copy", AuxInit("copy", "copied layers keep the backbone's current weights",
                                   lambda model, kwargs: lambda aux: aux))
