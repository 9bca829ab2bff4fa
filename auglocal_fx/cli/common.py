"""What every auglocal-* command shares: user errors become one line on stderr and exit code 2.

Under torchrun every process runs the command, and a user error (a recipe value, a missing file)
usually strikes them all alike: only rank 0 prints it, and every rank writes it to the error file
torchelastic gives it (``TORCHELASTIC_ERROR_FILE``), where the launcher finds it whichever rank
failed first. ``auglocal-train --nproc N`` is such a launcher: it prints that one line and exits 2
(plain ``torchrun`` shows it in its own failure report, after a traceback of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from ..errors import AugLocalError

__all__ = ["run_cli", "flag_names", "LAUNCHED", "torchrun_rank", "recorded_error"]

# set (to "1") by auglocal-train --nproc for the processes it starts: the launcher reports their errors
LAUNCHED = "AUGLOCAL_FX_LAUNCHED"


def run_cli(prog: str, body: Callable[[], int | None], parser: argparse.ArgumentParser | None = None,
            interrupted: str = "") -> int:
    """Run ``body``; an AugLocalError prints ``prog: error: message`` (one line, the parameter it is
    about named by its flag in ``parser``, e.g. ``--blocks 40 is ...``) and returns 2. Ctrl-C prints
    ``prog: interrupted`` and ``interrupted``, what to do next, and returns 130."""
    try:
        return body() or 0
    except AugLocalError as exc:
        _report(f"{prog}: error: {exc.worded(flag_names(parser))}")
        return 2
    except KeyboardInterrupt:
        _report(f"{prog}: interrupted{interrupted}", record=False)
        return 130


def torchrun_rank() -> int | None:
    """This process's global rank when torchrun (or ``auglocal-train --nproc``) started it, else None
    (torchelastic's agent sets TORCHELASTIC_RUN_ID for its workers; a LOCAL_RANK left in a shell is
    not enough: the command would then print nothing on a rank other than 0)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return int(os.environ.get("RANK", "0"))


def _report(line: str, record: bool = True) -> None:
    """``line`` on stderr, once per run: by rank 0 under torchrun, by the launcher under --nproc."""
    rank = torchrun_rank()
    if rank is None:
        print(line, file=sys.stderr)
        return
    if record:
        _record(line)
    if rank == 0 and os.environ.get(LAUNCHED) != "1":
        print(line, file=sys.stderr, flush=True)


def _record(line: str) -> None:
    """Write ``line`` where torchelastic reads a failed worker's message (its error file)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            # torchelastic's format (ErrorHandler.record_exception), the line in place of a traceback
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)
    except OSError:  # nowhere to record it: the exit status still says a worker failed
        pass


def recorded_error(prog: str, message) -> str | None:
    """The one-line user error a process of ``prog`` recorded (a torchelastic failure's ``message``), or None."""
    if isinstance(message, dict):
        message = message.get("message")
    return message if isinstance(message, str) and message.startswith(f"{prog}: error: ") else None


def flag_names(parser: argparse.ArgumentParser | None) -> dict[str, str]:
    """``{dest: its long flag}`` of every option ``parser`` has (``{"aux_depth": "--aux-depth"}``)."""
    if parser is None:
        return {}
    return {a.dest: next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0])
            for a in parser._actions if a.option_strings}
