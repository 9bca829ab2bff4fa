"""Pass 1 — trace: turn an ``nn.Module`` into a ``torch.fx.GraphModule``.

timm marks modules and functions that fx cannot trace through (dynamic shapes, data-dependent
control flow); we keep them as leaves with torchvision's ``LeafModuleAwareTracer``, exactly as
timm's own feature extractor does. The model's inputs are its first ``inputs`` forward arguments
(one: an image or token batch; more: token ids and an attention mask, an image and a metadata
vector); their placeholders are marked ``meta["model_input"]``. Forward arguments after them that
have defaults (a ViT's ``attn_mask``, ``is_causal``) are specialised to their defaults, so they
never appear as extra live values that would hide a cut.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import os
import traceback
from collections.abc import Callable

import torch
import torch.fx as fx
from timm.layers import DropBlock2d, DropPath, get_notrace_functions, get_notrace_modules
from torch import nn
from torchvision.models.feature_extraction import LeafModuleAwareTracer

from ..errors import AugLocalError, first_line
from .cuts import MODEL_INPUT

__all__ = ["Tracer", "make_tracer", "select_output", "trace", "finish_trace", "specialised_args", "positional_names",
           "training_kwargs"]

# Stochastic layers stay leaves: traced through, their train-mode branch adds nodes (and shifts
# node names) that the eval-mode trace lacks, so the two graphs could not be cut alike. As leaves
# they decide train/eval behaviour themselves at run time.
STOCHASTIC_LEAVES: tuple[type, ...] = (DropPath, DropBlock2d)


def is_stochastic_leaf(m: nn.Module) -> bool:
    """timm's drop-path / drop-block, or a model's own drop path: Hugging Face transformers defines one
    per model (``CvtDropPath``, ``SwinDropPath`` ...), each without weights or submodules."""
    return isinstance(m, STOCHASTIC_LEAVES) or (type(m).__name__.endswith("DropPath")
                                                and not any(True for _ in m.children()) and not any(True for _ in m.parameters()))

# What torch.fx raises for code it cannot trace: Proxy misuse (TypeError: iterating a Proxy,
# TraceError: control flow on one), and whatever the model's own code raises on a Proxy.
_TRACE_ERRORS = (fx.proxy.TraceError, TypeError, RuntimeError, AttributeError, ValueError, NameError,
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
        return is_stochastic_leaf(m) or super().is_leaf_module(m, module_qualname)

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


def positional_names(model: nn.Module) -> list[str]:
    """The names of ``model.forward``'s positional arguments, in order."""
    params = inspect.signature(model.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def training_kwargs(model: nn.Module) -> dict:
    """Keywords the model is traced and exported with: a Hugging Face decoder's key/value cache off
    (``use_cache=False``): it is for generation, not training, and no exporter takes a cache object as
    an output). A forward that takes the flag through ``**kwargs`` is known by its config's field."""
    params = inspect.signature(model.forward).parameters
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config  # composite: its text part
    through_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values()) and hasattr(config, "use_cache")
    return {"use_cache": False} if "use_cache" in params or through_kwargs else {}


def specialised_args(model: nn.Module, inputs: int = 1) -> dict:
    """Defaults of every forward argument after the first ``inputs``, to pass as fx ``concrete_args``.

    Raises AugLocalError if the forward needs another argument that has no default, or takes
    fewer than ``inputs`` positional arguments.
    """
    params = list(inspect.signature(model.forward).parameters.values())
    positional = positional_names(model)
    if len(positional) < inputs:
        raise AugLocalError(
            f"{type(model).__name__}.forward takes {len(positional)} positional argument(s), not the "
            f"{inputs} inputs example_inputs holds; give as many example inputs as forward takes tensors")
    concrete = {}
    for p in params[inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if isinstance(p.default, torch.Tensor):  # fx cannot make a constant of it (NameError deep inside)
            raise AugLocalError(
                f"{type(model).__name__}.forward argument {p.name!r} has a tensor default; make it a buffer "
                "the forward reads instead, or give it a default of None")
        if p.default is inspect.Parameter.empty:
            raise AugLocalError(
                f"{type(model).__name__}.forward needs argument {p.name!r} besides the input; give it a "
                f"default, or pass it as an input too: example_inputs=(x, {p.name})")
        concrete[p.name] = p.default
    return concrete


def trace(model: nn.Module, output: str | int | None = None, inputs: int = 1) -> fx.GraphModule:
    """Symbolically trace ``model`` in its current train/eval mode, taking its first ``inputs``
    forward arguments as inputs (``input_nodes``) and specialising the rest.

    The returned GraphModule shares every parameter and buffer with ``model``. A model returning
    several values (a dict, a tuple, a dataclass) gets the one ``output`` names (a key, an index or
    a field; default: ``"logits"``, else the first) as the graph's output: ``select_output``. The
    choice is ``gm.meta["output"]``, with a one-line note in ``gm.meta["output_note"]``.

    Example:
        >>> gm = trace(timm.create_model("resnet18"))
        >>> len(gm.graph.nodes) > 0
        True
    """
    tracer = make_tracer()
    concrete = specialised_args(model, inputs)
    try:
        graph = tracer.trace(model, concrete_args=concrete)
    except _TRACE_ERRORS as exc:  # the user needs the module at fault, and the fix that applies to it
        raise _untraceable(model, tracer, exc) from exc
    for p in [n for n in graph.nodes if n.op == "placeholder"][:inputs]:
        p.meta[MODEL_INPUT] = True
    return finish_trace(tracer.root, graph, model, output)


def finish_trace(root, graph: fx.Graph, model: nn.Module, output: str | int | None) -> fx.GraphModule:
    """What both front ends do after their trace: refuse train-mode auxiliary logits, make the graph
    return the one ``output``, drop unpacking nobody reads; the GraphModule over ``root`` (the model,
    or a dict of what the graph reads from it)."""
    _check_aux_logits(model)
    chosen, note = select_output(graph, output, type(model).__name__)
    _drop_unused_unpacking(graph)
    gm = fx.GraphModule(root, graph, type(model).__name__)
    gm.meta["output"], gm.meta["output_note"] = chosen, note
    return gm


def _untraceable(model: nn.Module, tracer: Tracer, exc: Exception) -> AugLocalError:
    """The one-line error for a model fx failed on, with the hint that applies: a Hugging Face
    transformers model needs another front end; a branch on a traced value is named where it is
    (module, source line, node) with how to keep its module whole; anything else, the leaf hint."""
    where = next(reversed(tracer.module_stack), "") if getattr(tracer, "module_stack", None) else ""
    module = model.get_submodule(where) if where else model
    name, culprit = type(model).__name__, type(module).__name__
    hf = next((type(m) for m in (model, module) if _from_transformers(type(m))), None)
    said = f"(fx: {type(exc).__name__} in module '{where or '<root>'}': {first_line(exc, 100, with_type=False)})"
    if hf is not None:
        return AugLocalError(
            f"torch.fx cannot trace {name}: it is a Hugging Face transformers model ({hf.__name__}); transformers "
            "v5 models do not trace with torch.fx (v5 dropped transformers.utils.fx). Trace it with torch.export: "
            f"frontend='export', or the default 'auto', which falls back to it {said}")
    if _control_flow(exc):
        at = ", ".join(x for x in (_failing_line(exc), _last_node(tracer)) if x)
        found = (f"torch.fx cannot trace {name}: module '{where or '<root>'}' ({culprit}) uses a traced tensor "
                 f"in Python control flow{f' ({at})' if at else ''}")
        if not where:  # the model's own forward: it cannot be a leaf of itself
            return AugLocalError(f"{found}. Hint: rewrite that code without data-dependent control flow "
                                 f"(torch.where, a mask), or move it into a submodule that can be a leaf {said}")
        return AugLocalError(
            f"{found}. Hint: leave that module whole as a leaf, timm.layers.register_notrace_module({culprit}) "
            "(any nn.Module class: it then runs as one node inside one layer, and layers= globs can name the "
            f"layers around it), or rewrite the branch without data-dependent control flow (torch.where) {said}")
    return AugLocalError(
        f"torch.fx cannot trace {name}: {type(exc).__name__} in module "
        f"'{where or '<root>'}' ({culprit}): {first_line(exc, 200, with_type=False)}. Hint: register "
        "that module class with timm.layers.register_notrace_module so it stays a leaf, or remove "
        "data-dependent control flow from its forward")


def _from_transformers(cls: type) -> bool:
    """Whether ``cls`` (or a class it derives from) comes from Hugging Face transformers."""
    return any(c.__module__.startswith("transformers.") for c in cls.__mro__)


def _control_flow(exc: Exception) -> bool:
    """fx's errors for Python control flow on a traced value: ``if`` / ``while`` on it (bool), a loop
    or ``*`` unpacking over it (iter), ``len`` of it."""
    return isinstance(exc, fx.proxy.TraceError) or "'len' is not supported in symbolic tracing" in str(exc)


def _failing_line(exc: Exception) -> str:
    """``file.py:22 `if x.sum() > 0:``` for the innermost frame of the model's own code (not torch's,
    not this tracer's), or ""."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    ours = {os.path.abspath(__file__), os.path.abspath(inspect.getfile(LeafModuleAwareTracer))}
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(torch_dir) and os.path.abspath(f.filename) not in ours]
    if not frames:
        return ""
    f = frames[-1]
    line = (f.line or "").split("#")[0].strip()  # without its comment
    code = f" `{line[:60]}`" if line else ""
    return f"{os.path.basename(f.filename)}:{f.lineno}{code}"


def _last_node(tracer: Tracer) -> str:
    """``node 'gt'``: the node traced last (the value the failing code reads), or ""."""
    graph = getattr(tracer, "graph", None)
    last = next(reversed(graph.nodes), None) if graph is not None else None
    return f"node {last.name!r}" if last is not None and last.op != "placeholder" else ""


def _check_aux_logits(model: nn.Module) -> None:
    """torchvision's GoogLeNet / Inception3 return auxiliary logits in train mode only: their train
    and eval graphs cannot be cut alike, and the extra heads are a training trick of their own."""
    if model.training and getattr(model, "aux_logits", False) is True:
        name = type(model).__name__
        raise AugLocalError(f"{name} returns auxiliary logits in train mode; build it without them, e.g. "
                            f"torchvision.models.{name.lower().replace('inception3', 'inception_v3')}"
                            "(aux_logits=False, init_weights=True)")


def _candidates(value) -> dict | None:
    """What a non-tensor output holds, by name or index: a dict's items, a (named) tuple's
    elements, a dataclass's fields (fx records its construction as one call); None for a tensor."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, tuple | list):
        items = dict(enumerate(value))
        if hasattr(value, "_fields"):  # a namedtuple: reachable by field name too
            items.update(zip(value._fields, value))
        return items
    if isinstance(value, fx.Node) and value.op == "call_function" and dataclasses.is_dataclass(value.target):
        names = [f.name for f in dataclasses.fields(value.target)]
        return {**dict(zip(names, value.args)), **value.kwargs}
    return None


def select_output(graph: fx.Graph, output: str | int | None, model_name: str = "the model") -> tuple:
    """Make ``graph`` return one tensor: the output's entry ``output`` (``None``: ``"logits"`` if
    there is one, else the first tensor). Returns ``(chosen, note)``; both None when the graph
    already returns a single value and ``output`` is None."""
    node = next(n for n in graph.nodes if n.op == "output")
    items = _candidates(node.args[0])
    if items is None:
        if output is not None:
            raise AugLocalError.bad_value("output", output, f"picks from a model output with several values, "
                                          f"but {model_name} returns one; leave output out")
        return None, None
    value = node.args[0]
    what = ("dict" if isinstance(value, dict) else value.target.__name__ if isinstance(value, fx.Node)
            else type(value).__name__)
    nodes = {k: v for k, v in items.items() if isinstance(v, fx.Node)}
    if output is None:
        if not nodes:
            raise AugLocalError(f"{model_name} returns a {what} without tensors; return the logits")
        chosen = "logits" if "logits" in nodes else next(iter(nodes))
        note = None if len(nodes) == 1 else (f"{model_name} returns several values ({what}); its {'element ' if isinstance(chosen, int) else ''}{chosen!r} is what trains and what net(x) returns "
                f"(output=... picks another of {', '.join(map(repr, nodes))})")
    else:
        if output not in nodes:
            raise AugLocalError.bad_value("output", output, f"is not in the {what} {model_name} returns; "
                                          f"choose one of {', '.join(map(repr, nodes))}")
        chosen, note = output, None
    old = node.args[0]
    node.args = (nodes[chosen],)
    if isinstance(old, fx.Node) and not old.users:  # the dataclass built from the values: gone
        graph.erase_node(old)
    return chosen, note


def _drop_unused_unpacking(graph: fx.Graph) -> None:
    """Remove ``t[i]`` / ``t.attr`` nodes nobody uses (``a, _ = f(x)`` leaves one per ignored value).

    Left in, such a node keeps the tuple it reads alive past the place where the model hands one
    tensor on, so that place would not be a valid cut. Only indexing and attribute reads count as
    pure here: fx's default notion of impurity would also drop unused in-place ops.
    """
    graph.eliminate_dead_code(
        is_impure_node=lambda n: not (n.op == "call_function" and n.target in (operator.getitem, getattr)))
