"""Pass 1 — trace: turn an ``nn.Module`` into a ``torch.fx.GraphModule``.

timm marks modules and functions that fx cannot trace through (dynamic shapes, data-dependent
control flow); we keep them as leaves, exactly as timm's own feature extractor does. Forward
arguments other than the input that have defaults (a ViT's ``attn_mask``, ``is_causal``) are
specialised to their defaults, so they never appear as extra live values that would hide a cut.
"""

from __future__ import annotations

import inspect

import torch.fx as fx
from torch import nn

from .errors import AugLocalError

try:  # timm is a dependency, but keep plain-torch models traceable if it is broken
    from timm.layers import DropBlock2d, DropPath, get_notrace_functions, get_notrace_modules

    # Stochastic layers stay leaves: traced through, their train-mode branch adds nodes (and shifts
    # node names) that the eval-mode trace lacks, so the two graphs could not be cut alike. As
    # leaves they decide train/eval behaviour themselves at run time.
    STOCHASTIC_LEAVES: tuple[type, ...] = (DropPath, DropBlock2d)
except ImportError:  # pragma: no cover
    STOCHASTIC_LEAVES = ()

    def get_notrace_modules():
        return []

    def get_notrace_functions():
        return []

__all__ = ["LeafTracer", "trace", "specialised_args"]


class LeafTracer(fx.Tracer):
    """An fx tracer that keeps timm's not-traced modules (and any ``extra_leaves``) as leaves."""

    def __init__(self, extra_leaves: tuple[type, ...] = ()):
        functions = tuple(f for f in get_notrace_functions() if callable(f))
        super().__init__(autowrap_functions=functions)
        self.leaf_types = tuple(get_notrace_modules()) + STOCHASTIC_LEAVES + tuple(extra_leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


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


def trace(model: nn.Module, extra_leaves: tuple[type, ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` in its current train/eval mode.

    The returned GraphModule shares every parameter and buffer with ``model``.

    Example:
        >>> gm = trace(timm.create_model("resnet18"))
        >>> len(gm.graph.nodes) > 0
        True
    """
    tracer = LeafTracer(extra_leaves)
    try:
        graph = tracer.trace(model, concrete_args=specialised_args(model))
    except AugLocalError:
        raise
    except Exception as exc:  # fx raises many types; the user needs the module at fault
        where = next(reversed(tracer.module_stack), "") if getattr(tracer, "module_stack", None) else ""
        culprit = type(model.get_submodule(where)).__name__ if where else type(model).__name__
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise AugLocalError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__} in module "
            f"'{where or '<root>'}' ({culprit}): {first_line}. Hint: register that module class with "
            "timm.layers.register_notrace_module so it stays a leaf, or remove data-dependent "
            "control flow from its forward") from None
    _drop_unused_unpacking(graph)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _drop_unused_unpacking(graph: fx.Graph) -> None:
    """Remove ``t[i]`` / ``t.attr`` nodes nobody uses (``a, _ = f(x)`` leaves one per ignored value).

    Left in, such a node keeps the tuple it reads alive past the place where the model hands one
    tensor on, so that place would not be a valid cut. Indexing and attribute reads are pure, so
    removing them changes nothing else (wider dead-code elimination could drop in-place ops).
    """
    import operator  # noqa: PLC0415

    for n in reversed(list(graph.nodes)):
        if n.op == "call_function" and n.target in (operator.getitem, getattr) and not n.users:
            graph.erase_node(n)
