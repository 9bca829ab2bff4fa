"""How a converted net takes its inputs: the model's inputs as the first block takes them (one
tensor, or the tuple of them), and the forward arguments torch.fx fixed at conversion, accepted
only at the values they were fixed to."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AugLocalError
from ..passes.trace import positional_names, specialised_args

__all__ = ["split_inputs", "as_bundle", "check_fixed_args"]


def split_inputs(model: nn.Module, n: int, inputs: tuple, kwargs: dict):
    """``(the model's n inputs as the first block takes them, further positional arguments, keyword
    arguments)`` of ``net(*inputs, **kwargs)``; an input may be passed by its forward's name (``mask=...``)."""
    if len(inputs) < n:
        names = positional_names(model)[len(inputs):n]
        if kwargs and all(name in kwargs for name in names):
            kwargs = dict(kwargs)
            inputs = (*inputs, *(kwargs.pop(name) for name in names))
        else:
            raise AugLocalError(f"net(...) got {len(inputs)} input(s); {type(model).__name__} was converted "
                                f"with {n} ({', '.join(positional_names(model)[:n])}): pass all of them")
    xs = inputs[:n]
    return (xs[0] if n == 1 else tuple(xs)), inputs[n:], kwargs


def as_bundle(model: nn.Module, n: int, x):
    """A training or evaluation batch's input as the first block takes it: the tensor, or the tuple
    of the model's inputs, checked against the ``n`` it was converted with."""
    got = len(x) if isinstance(x, tuple | list) else 1
    if got != n:
        raise AugLocalError(f"{type(model).__name__} was converted with {n} input(s) and got {got}: pass "
                            + ("one tensor" if n == 1 else f"a tuple of {n} tensors ({', '.join(positional_names(model)[:n])})"))
    return tuple(x) if n > 1 else (x[0] if isinstance(x, tuple | list) else x)


def check_fixed_args(model: nn.Module, n: int, args: tuple, kwargs: dict) -> None:
    """Accept arguments after the ``n`` inputs only at the values they were fixed to at conversion."""
    name_of = type(model).__name__
    names = positional_names(model)[n:]
    if len(args) > len(names):
        raise AugLocalError(f"net(x, ...) got {len(args) + n} positional arguments but {name_of}.forward "
                            f"takes {len(names) + n}; pass the input{'s' if n > 1 else ''} only")
    fixed = specialised_args(model, n)
    for name, value in {**dict(zip(names, args)), **kwargs}.items():
        if name not in fixed:
            raise AugLocalError(f"net(x, {name}=...): {name_of}.forward has no argument {name!r}; "
                                "pass the input only")
        if not _same_value(value, fixed[name]):
            raise AugLocalError(
                f"net(x, {name}=...): {name} was fixed to {_short(fixed[name])} when {name_of} was converted "
                "(torch.fx specialises the arguments after the input); to vary it, convert a subclass "
                f"whose forward(x) returns super().forward(x, {name}=self.{name}) and set that buffer "
                "before each call")


def _same_value(value, fixed) -> bool:
    if value is fixed:
        return True
    if isinstance(value, torch.Tensor) or isinstance(fixed, torch.Tensor):
        return False
    try:
        return bool(value == fixed)
    except (TypeError, ValueError, RuntimeError):  # an == that gives no single truth value (arrays)
        return False


def _short(value) -> str:
    """A default as one short line (a tensor's repr spans lines)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."
