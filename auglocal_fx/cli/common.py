"""What every auglocal-* command shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..errors import AugLocalError


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Run ``body``; an AugLocalError prints ``prog: error: message`` and returns 2."""
    try:
        return body() or 0
    except AugLocalError as exc:
        lines = str(exc).strip().splitlines() or ["unknown error"]
        print(f"{prog}: error: {lines[0]}", file=sys.stderr)  # one line, whatever was appended
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
