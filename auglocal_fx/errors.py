"""The one exception type a user can cause, and the one helper that turns any exception into a line.

The library words its messages for Python callers (``blocks=40 ...``); a CLI or a recipe names the
same parameter as its users know it (``--blocks 40``, ``recipe key conversion.blocks =``) through
``AugLocalError.worded``, which rebuilds the message from its parts (parameter, value, problem).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["AugLocalError", "AugLocalWarning", "first_line"]


class AugLocalError(ValueError):
    """A problem with the user's input (model, arguments, files).

    The message is a single line naming what is wrong and what to do about it. When it is about
    one parameter, ``param`` names it and the message starts with ``"{param}={value!r}"``.
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param
        self.value_text = self.problem = None  # set by bad_value: the parts ``worded`` rebuilds

    @classmethod
    def bad_value(cls, param: str, value, problem: str) -> AugLocalError:
        """``bad_value("blocks", 40, "is out of range")`` -> ``blocks=40 is out of range``."""
        exc = cls(f"{param}={value!r} {problem}", param=param)
        exc.value_text, exc.problem = repr(value), problem
        return exc

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with its parameter as the caller names it: with ``{"blocks": "--blocks"}``,
        ``blocks=40 is ...`` reads ``--blocks 40 is ...``. Messages about no parameter, or one
        ``names`` lacks, come back unchanged."""
        if self.problem is None or self.param not in names:
            return first_line(self, with_type=False)
        return first_line(AugLocalError(f"{names[self.param]} {self.value_text} {self.problem}"), with_type=False)


class AugLocalWarning(UserWarning):
    """Something the user should know about a conversion that still worked (e.g. far fewer layers
    than the model has blocks); one line, like the errors."""


def first_line(exc: BaseException, limit: int = 500, *, with_type: bool = True) -> str:
    """The first non-empty line of ``exc``'s message (libraries append context lines), at most
    ``limit`` characters, after the exception's type name unless ``with_type=False``."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")[:limit]
    if not with_type:
        return line or type(exc).__name__
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
