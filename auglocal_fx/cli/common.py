"""What every auglocal-* command shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from ..errors import AugLocalError


def run_cli(prog: str, body: Callable[[], int | None], flags: Mapping[str, str] | None = None) -> int:
    """Run ``body``; an AugLocalError prints ``prog: error: message`` (one line, the parameter it is
    about named by its flag from ``flags``, e.g. ``{"blocks": "--blocks"}``) and returns 2."""
    try:
        return body() or 0
    except AugLocalError as exc:
        print(f"{prog}: error: {exc.worded(flags or {})}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
