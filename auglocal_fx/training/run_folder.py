"""The run's folder: what a run writes there, and the checks before it writes anything.

A run folder holds one run: its checkpoints, metrics, plot, summary and filled-in recipe. Starting
a second run there would replace hours of training without a word, and a recipe saved inside it
would be overwritten by the run's own copy; both are refused before anything is built. A run writes
only into a new or empty folder, or one a run made: it leaves a marker there (``MARKER``, a note of
the run), and a folder that holds files but no marker (nor, from before the marker, a checkpoint of
a run) is refused, ``overwrite`` or not. While a run writes there, the marker is also its lock: an OS
lock (``fcntl.flock``) a second run into the folder cannot take, released when the holder ends,
however it ends, so a killed run never blocks the next.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..errors import AugLocalError

__all__ = ["clear_stale_temps", "CHECKPOINTS", "EPOCHS", "MARKER", "RUN_FILES", "SHARDS", "RunLock", "check_run_folder", "check_writable",
           "clear_run", "drop_unused_shards", "mark_run_folder"]

MARKER = ".auglocal-run"  # this tool made the folder; the run's note, and its lock while it writes there

CHECKPOINTS = ("last.pt", "best.pt")
# every file a run writes; --overwrite clears them so that the folder never mixes two runs
RUN_FILES = (*CHECKPOINTS, "metrics.jsonl", "curves.png", "summary.json", "recipe.yaml")
EPOCHS = "epoch-[0-9][0-9][0-9][0-9].pt"  # keep_checkpoints: the last N epochs' checkpoints, epoch-0012.pt
SHARDS = "shards"  # a pipeline run's checkpoints keep their weights there, a folder per saved epoch
# how each caller asks to continue a run / write elsewhere / replace it: messages use the caller's words
_WORDS = {"python": ("resume={last!r}", "another recipe.output", "overwrite=True"),
          "cli": ("--resume auto", "another folder (--set output=DIR)", "--overwrite")}


def check_run_folder(out, resume=None, overwrite: bool = False, *, words: str = "python", source=None) -> None:
    """Refuse to start a run in ``out`` when it holds another run's checkpoint, unless ``overwrite``,
    or when a file the run writes there is one of its inputs (``source``: the recipe file).

    A second ``auglocal-train`` into the same folder (another model, or the same recipe without
    ``--resume``) would replace that run's ``best.pt`` and ``last.pt``, hours of training, without a
    word. Resuming from a checkpoint inside ``out`` continues its run, so that is allowed.
    """
    out = Path(out)
    _check_inputs_kept(out, [source, resume])
    cont, elsewhere, replace = _WORDS[words]
    folders = [name for name in RUN_FILES if (out / name).is_dir()]
    if folders:  # found now, not when the first epoch's checkpoint fails to be written
        raise AugLocalError(f"output folder {out} holds a folder named {folders[0]} where the run writes that file; "
                            f"move it away, or write to {elsewhere}")
    held = [name for name in CHECKPOINTS if (out / name).is_file()]
    _check_made_here(out, held, elsewhere)
    if overwrite or not held:
        return
    if resume is not None and Path(resume).resolve().parent == out.resolve():
        return
    if "last.pt" not in held:  # nothing to continue from: best.pt is a chosen epoch, not where training stood
        raise AugLocalError(f"output folder {out} holds a run's best.pt but no last.pt to continue from; train on from "
                            f"its weights in a new run (recipe key model.checkpoint={out / 'best.pt'}) written to "
                            f"{elsewhere}, or pass {replace} to replace it")
    cont = cont.format(last=str(out / held[0]))
    raise AugLocalError(f"output folder {out} already holds a run ({', '.join(held)}); continue it with {cont}, "
                        f"write to {elsewhere}, or pass {replace} to replace it")


def _check_made_here(out: Path, held: list[str], elsewhere: str) -> None:
    """A folder that holds files is a run's only when a run made it (its marker, or from before the
    marker, its checkpoints): anything else there is the user's, and nothing of theirs is replaced."""
    if not out.is_dir() or held or (out / MARKER).is_file():
        return
    found = sorted(p.name for p in out.iterdir() if not p.name.startswith(".auglocal"))  # not ours (a write probe)
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise AugLocalError(f"output folder {out} holds files no run wrote ({shown}); a run writes into a new or "
                            f"empty folder, or one a run made: write to {elsewhere}")


def mark_run_folder(out: Path) -> None:
    """Make ``out`` a run's folder before the run starts (a tool that writes its own file there first,
    a training log): the run then takes it as made by a run."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


class RunLock:
    """The run folder's lock while this process writes there: ``fcntl.flock`` on ``MARKER``, which
    keeps a note of the holder (process, start, recipe) for the refusal a second run gets."""

    def __init__(self, out: Path, note: dict, elsewhere: str = "another folder (recipe key output)"):
        self.path, self.fd = Path(out) / MARKER, None
        try:
            import fcntl
        except ImportError:  # not POSIX: the folder is marked, not locked
            fcntl = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_note(fd)
                os.close(fd)
                who = f"process {holder['pid']}, started {holder.get('started', '?')}" if "pid" in holder else "a process"
                raise AugLocalError(f"output folder {out} is in use by another run ({who}); wait for it to end, or "
                                    f"write to {elsewhere}") from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), **note}) + "\n")
                 .encode())

    def release(self) -> None:
        """Let go of the lock (the marker stays: the folder is a run's)."""
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases its flock
            self.fd = None

    def __del__(self) -> None:  # a Trainer made without train() (tests, tools) lets go when collected
        self.release()


def _read_note(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def _check_inputs_kept(out: Path, inputs) -> None:
    """A run never writes over its own input: a recipe saved as ``<output>/recipe.yaml`` would be
    replaced by the filled-in copy the run writes there (comments gone), even with ``overwrite``."""
    written = {(out / name).resolve(): name for name in RUN_FILES if name not in CHECKPOINTS}
    for given in inputs:
        if given is not None and Path(given).resolve() in written:
            raise AugLocalError(f"{given} is an input of this run, and the run writes {written[Path(given).resolve()]} "
                                f"in its output folder {out}: rename the recipe or write to another folder "
                                "(recipe key output)")


def clear_run(out: Path) -> None:
    """Delete the files of the run ``out`` holds (``overwrite``): a crash in the new run's first epoch
    must not leave the old ``last.pt`` for ``--resume auto`` to continue under the new recipe."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for kept in out.glob(EPOCHS):
        kept.unlink(missing_ok=True)
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


def clear_stale_temps(out: Path) -> None:
    """Delete the temp files a killed run left beside the files it was writing (``atomic.py`` writes
    ``.NAME.XXXX.tmp`` and renames it): called while this run holds the folder's lock, so no other
    run is writing them."""
    for name in (*RUN_FILES, MARKER, EPOCHS):
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def drop_unused_shards(out: Path, kept: set) -> None:
    """Delete the shard folders no checkpoint file names any more (after last.pt / best.pt moved on)."""
    for folder in (out / SHARDS).glob("*"):
        if f"{SHARDS}/{folder.name}" not in kept:
            shutil.rmtree(folder, ignore_errors=True)


def check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise AugLocalError(f"recipe key output {out} is a file; give a folder for the run's files (a new or empty one)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".auglocal-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise AugLocalError(f"output directory {out} is not writable ({exc.strerror}); "
                            "set recipe key output to a writable folder") from exc
