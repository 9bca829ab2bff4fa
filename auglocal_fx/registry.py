"""Named choices of one parameter (rules, balance policies, aux inits): the one source of every
list of choices a user sees, and of the one-line error for a name that is not there."""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import AugLocalError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """``name -> entry`` for parameter ``param``; ``kind`` names one entry in errors, with its article ("a rule").

    Example:
        >>> RULES = Registry("rule", "a rule")
        >>> RULES.register("bp", None)
        >>> RULES.lookup("hebbian")
        Traceback (most recent call last):
        AugLocalError: rule='hebbian' is not a rule; choose one of bp
    """

    def __init__(self, param: str, kind: str):
        super().__init__()
        self.param, self.kind = param, kind

    def register(self, name: str, entry: T) -> T:
        """Make ``entry`` selectable as ``param=name``; returns it (usable as a decorator's body)."""
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry called ``name``, or an AugLocalError about ``param`` listing the choices."""
        if not isinstance(name, str) or name not in self:
            raise AugLocalError.bad_value(self.param, name, f"is not {self.kind}; choose one of {', '.join(self)}")
        return self[name]
