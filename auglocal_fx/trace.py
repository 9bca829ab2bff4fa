"""Pass 1 — trace: turn an ``nn.Module`` into a ``torch.fx.GraphModule``.

timm marks modules and functions that fx cannot trace through (dynamic shapes, data-dependent
control flow); we keep them as leaves with torchvision's ``LeafModuleAwareTracer``, exactly as
timm's own feature extractor does. Forward arguments other than the input that have defaults (a
ViT's ``attn_mask``, ``is_causal``) are specialised to their defaults, so they never appear as
extra live values that would hide a cut.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable

import torch.fx as fx
from timm.layers import DropBlock2d, DropPath, get_notrace_functions, get_notrace_modules
from torch import nn
from torchvision.models.feature_extraction import LeafModuleAwareTracer

from .errors import AugLocalError, first_line

__all__ = ["Tracer", "make_tracer", "trace", "specialised_args"]

# Stochastic layers stay leaves: traced through, their train-mode branch adds nodes (and shifts
# node names) that the eval-mode trace lacks, so the two graphs could not be cut alike. As leaves
# they decide train/eval behaviour themselves at run time.
STOCHASTIC_LEAVES: tuple[type, ...] = (DropPath, DropBlock2d)

# What torch.fx raises for code it cannot trace: Proxy misuse (TypeError: iterating a Proxy,
# TraceError: control flow on one), and whatever the model's own code raises on a Proxy.
_TRACE_ERRORS = (fx.proxy.TraceError, TypeError, RuntimeError, AttributeError, ValueError,
                 NotImplementedError, AssertionError, IndexError, KeyError)


def _encoder_forward(enc: nn.TransformerEncoder, src):
    """``nn.TransformerEncoder.forward`` without masks: its layers in turn, then its norm. The
    original's fast-path checks branch on tensor properties, which fx cannot trace."""
    for layer in enc.layers:
        src = layer(src)
    return enc.norm(src) if enc.norm is not None else src


def _encoder_layer_forward(layer: nn.TransformerEncoderLayer, x):
    """``nn.TransformerEncoderLayer.forward`` without masks: the documented slow path, which the
    fast path (eval, no grad) matches to float tolerance."""
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), None, None)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, None, None))
    return layer.norm2(x + layer._ff_block(x))


# torch.nn modules fx would keep whole (it treats all of torch.nn as leaves) whose layers we need to
# see, with a traceable forward for the call without masks. Called with a mask, they stay leaves.
_TRACE_THROUGH: dict[type, Callable] = {
    nn.TransformerEncoder: _encoder_forward,
    nn.TransformerEncoderLayer: _encoder_layer_forward,
}


def _plain_call(args: tuple, kwargs: dict) -> bool:
    """One input tensor; every mask argument absent or None, and not causal."""
    return len(args) == 1 and all(v is None or v is False for v in kwargs.values())


class Tracer(LeafModuleAwareTracer):
    """``LeafModuleAwareTracer`` that also traces through ``nn.TransformerEncoder`` (and its layers)
    when called without masks, so each encoder layer can become a layer of the plan."""

    def is_leaf_module(self, m: nn.Module, module_qualname: str) -> bool:
        if type(m) in _TRACE_THROUGH and getattr(self, "_plain", False):
            return False
        return super().is_leaf_module(m, module_qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        fn = _TRACE_THROUGH.get(type(m))
        if fn is not None and _plain_call(args, kwargs):
            outer, self._plain = getattr(self, "_plain", False), True
            try:
                return super().call_module(m, lambda x: fn(m, x), args, {})
            finally:
                self._plain = outer
        return super().call_module(m, forward, args, kwargs)


def make_tracer() -> Tracer:
    """A tracer that keeps timm's not-traced modules (and drop-path / drop-block) as leaves and
    wraps timm's not-traced functions."""
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    leaves = tuple(get_notrace_modules()) + STOCHASTIC_LEAVES
    return Tracer(leaf_modules=leaves, autowrap_functions=functions)


def specialised_args(model: nn.Module) -> dict:
    """Defaults of every forward argument after the first, to pass as fx ``concrete_args``.

    Raises AugLocalError if the forward needs a second argument that has no default.
    """
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise AugLocalError(
                f"{type(model).__name__}.forward needs argument {p.name!r} besides the input; "
                "give it a default or wrap the model so forward takes one tensor")
        concrete[p.name] = p.default
    return concrete


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` in its current train/eval mode.

    The returned GraphModule shares every parameter and buffer with ``model``.

    Example:
        >>> gm = trace(timm.create_model("resnet18"))
        >>> len(gm.graph.nodes) > 0
        True
    """
    tracer = make_tracer()
    concrete = specialised_args(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete)
    except _TRACE_ERRORS as exc:  # the user needs the module at fault
        where = next(reversed(tracer.module_stack), "") if getattr(tracer, "module_stack", None) else ""
        culprit = type(model.get_submodule(where)).__name__ if where else type(model).__name__
        raise AugLocalError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__} in module "
            f"'{where or '<root>'}' ({culprit}): {first_line(exc, 200, with_type=False)}. Hint: register "
            "that module class with timm.layers.register_notrace_module so it stays a leaf, or remove "
            "data-dependent control flow from its forward") from exc
    _drop_unused_unpacking(graph)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _drop_unused_unpacking(graph: fx.Graph) -> None:
    """Remove ``t[i]`` / ``t.attr`` nodes nobody uses (``a, _ = f(x)`` leaves one per ignored value).

    Left in, such a node keeps the tuple it reads alive past the place where the model hands one
    tensor on, so that place would not be a valid cut. Only indexing and attribute reads count as
    pure here: fx's default notion of impurity would also drop unused in-place ops.
    """
    graph.eliminate_dead_code(
        is_impure_node=lambda n: not (n.op == "call_function" and n.target in (operator.getitem, getattr)))
