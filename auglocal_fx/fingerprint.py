"""A plan's fingerprint: what the plan was made on, so that it is only ever applied to that model.

A plan names its cuts by fx node names and its layers by module paths, which another model of
the family often has too: a ResNet-20 plan applied to a ResNet-32 finds every boundary it names
and builds a net, silently wrong. The fingerprint records, per layer of the plan, a short digest
of the names and shapes of the parameters and buffers under the module paths the layer is named
after (``LayerInfo.name``: ``blocks.3``, ``stem.0..stem.2``), the same for everything no layer
names (the head), the whole model's, and the input size. Checking a plan against a model reads
only ``named_parameters`` and ``named_buffers``: no tracing, no planning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from torch import nn

from .errors import AugLocalError

__all__ = ["plan_fingerprint", "check_fingerprint", "PLAN_ANEW"]

PLAN_ANEW = "plan this model anew (auglocal-convert, or to_auglocal without plan=)"

# (name, shape, parameter count): a buffer counts no parameters
_Entry = tuple[str, tuple[int, ...], int]


def plan_fingerprint(model: nn.Module, plan) -> dict:
    """The fingerprint of ``plan``'s layers on ``model``: ``{"input_size": [...], "model": d,
    "layers": [d, ...], "head": d}``, each ``d`` a digest of parameter and buffer names and shapes
    followed by the parameter count (``"9c1e03aa/4672"``). ``build_plan`` stores it in
    ``plan.fingerprint``; ``check_fingerprint`` compares it with the model a plan is given.

    Example:
        >>> plan = build_plan(model, blocks=4)
        >>> plan_fingerprint(model, plan) == plan.fingerprint
        True
    """
    entries = _entries(model)
    parts = _split(model, entries, [layer.name for layer in plan.layers])
    return {"input_size": list(plan.config.input_size), "model": _digest(entries),
            "layers": [_digest(p) for p in parts[:-1]], "head": _digest(parts[-1])}


def check_fingerprint(model: nn.Module, plan, *, lead: str = "the plan was made for another model",
                      fix: str = PLAN_ANEW) -> None:
    """Raise a one-line ``AugLocalError`` naming the first difference when ``plan`` was made for
    another model than ``model``. A plan without a fingerprint (written before plans had one) is
    accepted; one with part of it is checked on that part. ``lead`` starts the message, ``fix``
    ends it with what to do.

    Example:
        >>> check_fingerprint(resnet32, plan_made_for_resnet20)
        Traceback (most recent call last):
        AugLocalError: the plan was made for another model (272k parameters; this one has 467k): layer 4 'blocks.3' ...
    """
    fp = plan.fingerprint
    if not fp:
        return
    try:
        problem = _first_difference(model, plan, fp)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a fingerprint edited into nonsense
        raise AugLocalError(f"the plan's fingerprint is malformed ({type(exc).__name__}); {fix}") from exc
    if problem:
        totals, difference = problem
        raise AugLocalError(f"{difference}; {fix}" if totals is None else f"{lead}{totals}: {difference}; {fix}")


def _first_difference(model: nn.Module, plan, fp: dict) -> tuple[str | None, str] | None:
    """What first differs between ``model`` and the fingerprint ``fp`` of ``plan``, or None: the
    parameter totals when they differ (`` (272k parameters; this one has 467k)``; None when the plan
    disagrees with itself) and the difference."""
    if "input_size" in fp and list(fp["input_size"]) != list(plan.config.input_size):
        return None, (f"the plan was made at input size {_shape(fp['input_size'])} but its config says "
                    f"{_shape(plan.config.input_size)} (edited by hand?)")
    entries = _entries(model)
    names = [layer.name for layer in plan.layers]
    parts = _split(model, entries, names)
    here, there = _params(entries), _count(fp.get("model"))
    totals = f" ({_si(there)} parameters; this one has {_si(here)})" if there is not None and there != here else ""
    if "layers" in fp:
        if len(fp["layers"]) != len(names):
            return None, (f"the plan's fingerprint lists {len(fp['layers'])} layers but the plan has {len(names)} "
                          "(edited by hand?)")
        for i, (name, part, theirs) in enumerate(zip(names, parts, fp["layers"])):
            if _digest(part) != theirs:
                return totals, f"layer {i} {name!r} {_differs(part, theirs)}"
    if "head" in fp and _digest(parts[-1]) != fp["head"]:
        return totals, f"what no layer of the plan holds (the head) {_differs(parts[-1], fp['head'])}"
    if "model" in fp and _digest(entries) != fp["model"]:
        return totals, f"the model {_differs(entries, fp['model'])}"
    return None


def _entries(model: nn.Module) -> list[_Entry]:
    """Every parameter, then every buffer: (name, shape, parameters); shared tensors once."""
    params = [(n, tuple(p.shape), p.numel()) for n, p in model.named_parameters()]
    return params + [(n, tuple(b.shape), 0) for n, b in model.named_buffers()]


def _covered(model: nn.Module, name: str) -> list[str]:
    """The module (or parameter) paths a layer named ``name`` stands for: ``name`` itself, or for
    ``a..b`` (the first and last module of the layer) both ends and, where they are children of one
    module, that module's children between them (``stem.0..stem.2``: ``stem.0``, ``stem.1``, ``stem.2``)."""
    if ".." not in name:
        return [name]
    a, b = name.split("..", 1)
    parent, _, first = a.rpartition(".")
    parent_b, _, last = b.rpartition(".")
    if parent == parent_b:
        try:
            kids = [k for k, _ in model.get_submodule(parent).named_children()]
        except AttributeError:  # no such module here: only the two ends
            kids = []
        if first in kids and last in kids and kids.index(first) <= kids.index(last):
            return [f"{parent}.{k}" if parent else k for k in kids[kids.index(first):kids.index(last) + 1]]
    return [a, b]


def _split(model: nn.Module, entries: list[_Entry], layer_names: list[str]) -> list[list[_Entry]]:
    """``entries`` per layer (an entry under two layers' paths counts in both), then what no layer holds."""
    owners: dict[str, list[int]] = {}
    for i, name in enumerate(layer_names):
        for path in _covered(model, name):
            owners.setdefault(path, []).append(i)
    parts: list[list[_Entry]] = [[] for _ in range(len(layer_names) + 1)]
    for entry in entries:
        name, mine = entry[0], set()
        while name:  # the entry's own path and every module above it
            mine.update(owners.get(name, ()))
            name = name.rpartition(".")[0]
        for i in sorted(mine) or [len(layer_names)]:
            parts[i].append(entry)
    return parts


def _digest(entries: Iterable[_Entry]) -> str:
    entries = list(entries)
    h = hashlib.blake2b(digest_size=4)
    for name, shape, _ in entries:
        h.update(f"{name}:{'x'.join(map(str, shape))};".encode())
    return f"{h.hexdigest()}/{_params(entries)}"


def _params(entries: Iterable[_Entry]) -> int:
    return sum(n for _, _, n in entries)


def _count(digest) -> int | None:
    """The parameter count a digest ends with; None for a malformed one."""
    try:
        return int(str(digest).rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


def _differs(part: list[_Entry], theirs) -> str:
    """``has parameters a.weight 16x16x3x3, ... (4.6k) here, the plan's has 14k`` (or ``... in other
    names or shapes`` when the counts agree)."""
    mine = [(n, s) for n, s, _ in part]
    if not mine:
        what = "has no parameters or buffers here"
    else:
        shown = ", ".join(f"{n} {_shape(s)}" for n, s in mine[:2]) + (", ..." if len(mine) > 2 else "")
        what = f"has parameters {shown} ({_si(_params(part))}) here"
    count = _count(theirs)
    if count is None:
        return f"{what}, the plan's fingerprint there is malformed"
    if count != _params(part):
        return f"{what}, the plan's has {_si(count)}"
    return f"{what}, the plan's has as many in other names or shapes"


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if len(shape) else "scalar"


def _si(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)
