"""What every auglocal-* command shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..errors import AugLocalError


def run_cli(prog: str, body: Callable[[], int | None], parser: argparse.ArgumentParser | None = None) -> int:
    """Run ``body``; an AugLocalError prints ``prog: error: message`` (one line, the parameter it is
    about named by its flag in ``parser``, e.g. ``--blocks 40 is ...``) and returns 2."""
    try:
        return body() or 0
    except AugLocalError as exc:
        print(f"{prog}: error: {exc.worded(flag_names(parser))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def flag_names(parser: argparse.ArgumentParser | None) -> dict[str, str]:
    """``{dest: its long flag}`` of every option ``parser`` has (``{"aux_depth": "--aux-depth"}``)."""
    if parser is None:
        return {}
    return {a.dest: next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0])
            for a in parser._actions if a.option_strings}
