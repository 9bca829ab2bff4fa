"""Files written so that a crash never leaves a half-written one: temp file in the same folder + rename."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import AugLocalError

__all__ = ["atomic_write", "atomic_write_text", "atomic_savefig", "check_output_path"]


def check_output_path(path: str | os.PathLike, inputs=(), name: str = "path", overwrite: bool | None = None) -> Path:
    """Refuse an output ``path`` that is a folder or one of the command's own ``inputs``, and, with
    ``overwrite=False`` (a command's default), a file that exists: a trained checkpoint given as
    ``--save`` or ``--out`` by mistake would be gone (``overwrite=None``: not checked).

    Checked before any work is done, so a mistake costs nothing: writing onto an input would destroy it
    (``auglocal-export c.pt --out c.pt``), and a folder fails only after minutes of work otherwise.
    ``name`` is how the caller names the argument (``--out``, ``path=``, a recipe key).
    """
    path = Path(path)
    if path.is_dir():
        raise AugLocalError(f"{name} {path} is a folder; give a file path (for example one inside it)")
    for other in inputs:
        if other is not None and _same_file(path, Path(other)):
            raise AugLocalError(f"{name} {path} is also this command's input {other}; writing it would destroy "
                                "the input: choose another output path")
    if overwrite is False and path.exists():
        raise AugLocalError(f"{name} {path} already exists; pass --overwrite to replace it, or choose another path")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    Readers see the old file or the new one, never a mix.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise AugLocalError(f"cannot write {path}: {exc.strerror}; choose a writable location") from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` for UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_savefig(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render a matplotlib figure to PNG, write it with ``atomic_write`` and close the figure."""
    import matplotlib.pyplot as plt  # only where a figure exists

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))
