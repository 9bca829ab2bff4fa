"""Which modules form the groups that become layers, read off the module tree alone (no graph).

A module path maps to its group's key: from timm's ``group_matcher(coarse=False)`` when the model has
one, else from the module tree (each module reached by descending through containers), or from the
user's module-path globs (``layers=``). And the repeated blocks of the tree: the children of a
container that share a composite class with a sibling (a stage's blocks), which ``layers.py``
refines groups into and ``repeated_blocks`` counts (the granularity a plan is measured against).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Hashable

from timm.models._manipulate import group_with_matcher  # timm re-exports only group_modules/parameters
from torch import nn

from ..errors import AugLocalError
from ..plan import check_pattern_list

__all__ = ["check_patterns", "group_key_fn", "pattern_key_fn", "repeated_blocks", "repeated_children"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_HEAD_SENTINEL = "\x00auglocal-head-sentinel"


def _timm_key_fn(model: nn.Module) -> Callable[[str], Hashable | None] | None:
    matcher_fn = getattr(model, "group_matcher", None)
    if not callable(matcher_fn):
        return None
    try:
        matcher = matcher_fn(coarse=False)
    except (TypeError, NotImplementedError):  # a group_matcher of another signature: use the module tree
        return None
    names = [n for n, _ in model.named_modules() if n]
    names += [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    # timm puts every unmatched name (neck, head) in one last group; the sentinel finds it.
    ids = group_with_matcher(((n, n) for n in names + [_HEAD_SENTINEL]), matcher, reverse=True)
    head = ids[_HEAD_SENTINEL]
    return lambda path: None if ids.get(path, head) == head else ids[path]


def _tree_key_fn(model: nn.Module) -> Callable[[str], Hashable | None]:
    def key(path: str):
        mod, parts = model, path.split(".")
        for i, part in enumerate(parts):
            parent, mod = mod, getattr(mod, part, None)
            if mod is None:
                return None
            # a container is descended into, unless it is one of its parent's repeated blocks and
            # holds no repeated blocks itself: a ModuleList of Sequential(LayerNorm, Linear, GELU,
            # Linear) blocks gives one group per block, not one per Linear
            if not isinstance(mod, _CONTAINERS) or (
                    part in repeated_children(parent) and not repeated_children(mod)):
                return ".".join(parts[: i + 1])
        return None  # a container itself is not a group; its children are

    return key


def check_patterns(model: nn.Module, patterns) -> tuple[str, ...]:
    """``patterns`` (module-path globs, e.g. ``["features.*", "classifier.1"]``) as a tuple, each
    checked to match at least one module path of ``model``."""
    check_pattern_list(patterns)
    paths = [n for n, _ in model.named_modules() if n]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(p, pat) for p in paths):
            near = [p for p in paths if "." not in p][:6]
            raise AugLocalError.bad_value(
                "layers", pat, f"matches no module of {type(model).__name__}; paths are dotted names "
                f"from model.named_modules(), e.g. {', '.join(near)}", )
    return tuple(patterns)


def pattern_key_fn(patterns: tuple[str, ...]) -> Callable[[str], Hashable | None]:
    """A module path's group: its shallowest prefix that a pattern matches (None: no group)."""
    def key(path: str):
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if any(fnmatch.fnmatchcase(prefix, pat) for pat in patterns):
                return prefix
        return None

    return key


def group_key_fn(model: nn.Module) -> tuple[Callable[[str], Hashable | None], bool]:
    """Map a module path to its group key (None = not in any layer). Second item: from timm."""
    fn = _timm_key_fn(model)
    return (fn, True) if fn is not None else (_tree_key_fn(model), False)


def repeated_children(container: nn.Module) -> list[str]:
    """Names of the children of ``container`` (a Sequential / ModuleList / ModuleDict) whose class
    occurs twice or more among them and is composite (``_is_block``): the blocks of a stage."""
    if not isinstance(container, _CONTAINERS):
        return []
    kids = [(name, m, _signature(m)) for name, m in container.named_children()]
    count: dict[Hashable, int] = {}
    for _, _, sig in kids:
        count[sig] = count.get(sig, 0) + 1
    return [name for name, m, sig in kids if count[sig] >= 2 and _is_block(m)]


def _signature(m: nn.Module) -> Hashable:
    """What makes two siblings "the same block": their class, and for a container (every
    ``Sequential`` is one class) the signatures of its children too."""
    if isinstance(m, _CONTAINERS):
        return type(m), tuple(_signature(c) for c in m.children())
    return type(m)


def _is_block(m: nn.Module) -> bool:
    """A composite module: one of its children holds parameters (a norm+activation pair does not)."""
    return any(p is not None for child in m.children() for p in child.parameters())


def repeated_blocks(model: nn.Module) -> int:
    """How many repeated blocks the module tree holds: the children of a container that share a
    composite class with a sibling (``repeated_children``), each counted as one block unless it
    holds repeated blocks itself, which are then counted instead (resnet50: 16 bottlenecks;
    densenet121: 58 dense layers + 3 transitions; vit_base: 12)."""

    def count(m: nn.Module) -> int:
        blocks = set(repeated_children(m))
        return sum(max(1, count(child)) if name in blocks else count(child) for name, child in m.named_children())

    return count(model)
