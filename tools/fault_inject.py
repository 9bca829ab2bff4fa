"""Kill auglocal-train with SIGKILL at chosen points, resume it, and compare with the run never killed.

A kill point is the k-th event of a kind in a training process: ``step`` (right after the k-th
training step), ``write`` (inside the k-th file write, the temp file written and synced but not yet
renamed over the file) and ``rename`` (right after the k-th rename, before anything else is written).
For each point the tool starts the run in a child process armed to SIGKILL itself there, then runs
``auglocal-train RECIPE --resume auto`` to the end, and checks that nothing was lost or changed:

- the resumed run's per-epoch record (every step's loss, validation loss and accuracies, learning
  rate), last.pt's and best.pt's weights and summary.json equal the uninterrupted run's, bitwise;
- every file the user had before (the recipe, a file beside it) is unchanged (SHA-256);
- the run folder holds no temp file afterwards.

    python tools/fault_inject.py                  # every kill point of a 2-epoch run; exit 1 on a loss
    python tools/fault_inject.py --points step:3 write:5 rename:2

The run is tiny (your-own-model path: tests/own_model_fixture.py) and one thread, so it is exact and
quick; a kill point past the run's last event is reported as not reached.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import yaml  # noqa: E402

KINDS = ("step", "write", "rename")
RECIPE = {"model": {"factory": "own_model_fixture:small_cnn", "kwargs": {"width": 4}},
          "data": {"dataset": "own_model_fixture:blobs", "kwargs": {"n": 96}, "num_workers": 0, "val_split": 16},
          "conversion": {"blocks": 3, "aux_depth": 1}, "optimizer": {"name": "sgd", "lr": 0.05},
          "epochs": 2, "batch_size": 16, "seed": 7, "device": "cpu", "threads": 1, "log_interval": 1}
# what an epoch's record may differ in between two runs: how long it took and what memory it held
TIMING = ("epoch_time_s", "images_per_s", "peak_rss_gib", "peak_allocated_gib", "busy_s", "wall_s")


def _arm(kind: str, k: int) -> None:
    """In the child: SIGKILL this process at the k-th event of ``kind``."""
    count = [0]

    def hit() -> None:
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    if kind == "step":
        from auglocal_fx.training.trainer import Trainer

        step = Trainer._step

        def stepped(self, *a, **kw):
            out = step(self, *a, **kw)
            hit()
            return out

        Trainer._step = stepped
    elif kind == "write":
        real_fsync = os.fsync

        def fsync(fd):  # atomic_write: the temp file written, about to be synced and renamed
            hit()
            return real_fsync(fd)

        os.fsync = fsync
    else:
        real_replace = os.replace

        def replace(src, dst, **kw):
            result = real_replace(src, dst, **kw)
            hit()
            return result

        os.replace = replace


def child(kind: str, k: int, argv: list[str]) -> int:
    _arm(kind, k)
    from auglocal_fx.cli.train import main

    return main(argv)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(argv: list[str]) -> tuple[int, str]:
    """``auglocal-train argv`` in this process: its exit status and the last line it printed on stderr."""
    from auglocal_fx.cli.train import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, (err.getvalue().strip().splitlines() or [""])[-1]


def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path, name: str = "last.pt") -> dict:
    import torch

    payload = torch.load(out / name, weights_only=True)
    return {f"{part}.{k}": v for part in ("model_state", "aux_state") for k, v in payload[part].items()}


def _outcome(out: Path) -> tuple:
    """What a finished run leaves that a kill could spoil: the per-epoch records, last.pt's and
    best.pt's weights, and the summary's figures (its test accuracy of best.pt)."""
    summary = json.loads((out / "summary.json").read_text())
    return (_records(out), _weights(out), _weights(out, "best.pt"),
            {k: v for k, v in summary.items() if k not in (*TIMING, "train_time_s", "output")})


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _recipe(folder: Path, out: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text("# my experiment\n" + yaml.safe_dump({**RECIPE, "output": str(out)}, sort_keys=False))
    return path


def run_point(kind: str, k: int, folder: Path, reference: tuple) -> str:
    """One kill point: ``"ok"``, ``"not reached"``, or what was lost."""
    folder.mkdir()
    out = folder / "run"
    recipe = _recipe(folder, out)
    notes = folder / "notes.txt"
    notes.write_text("the user's own file beside the recipe\n")
    before = {p: _sha(p) for p in (recipe, notes)}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import fault_inject; "
            f"sys.exit(fault_inject.child({kind!r}, {k}, {[str(recipe)]!r}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=env, timeout=600)
    if proc.returncode != -signal.SIGKILL:
        return "not reached" if proc.returncode == 0 else f"the armed run failed ({proc.returncode}): {proc.stderr[-500:]}"
    rc, said = _train([str(recipe), "--resume", "auto"])
    if rc != 0:
        return f"the resume exited {rc}: {said}"
    lost = []
    records, last, best, summary = _outcome(out)
    if records != reference[0]:
        lost.append("the per-epoch records differ from the run never killed")
    if not _same(last, reference[1]):
        lost.append("last.pt's weights differ from the run never killed")
    if not _same(best, reference[2]):
        lost.append("best.pt's weights differ from the run never killed")
    if summary != reference[3]:
        lost.append("summary.json differs from the run never killed")
    changed = [p.name for p, h in before.items() if _sha(p) != h]
    if changed:
        lost.append(f"the user's files changed: {', '.join(changed)}")
    temps = sorted(p.name for p in out.glob(".*.tmp"))
    if temps:
        lost.append(f"temp files left: {', '.join(temps)}")
    return "; ".join(lost) or "ok"


def count_events(folder: Path) -> dict[str, int]:
    """How many events of each kind an uninterrupted run has (each is a kill point)."""
    import torch  # noqa: F401  (imported before arming: its own import writes nothing)

    counts = dict.fromkeys(KINDS, 0)
    from auglocal_fx.training.trainer import Trainer

    step, fsync, replace = Trainer._step, os.fsync, os.replace

    def counting_step(self, *a, **kw):
        counts["step"] += 1
        return step(self, *a, **kw)

    def counting_fsync(fd):
        counts["write"] += 1
        return fsync(fd)

    def counting_replace(src, dst, **kw):
        counts["rename"] += 1
        return replace(src, dst, **kw)

    Trainer._step, os.fsync, os.replace = counting_step, counting_fsync, counting_replace
    try:
        folder.mkdir()
        rc, said = _train([str(_recipe(folder, folder / "run"))])
        assert rc == 0, f"the uninterrupted run failed: {said}"
    finally:
        Trainer._step, os.fsync, os.replace = step, fsync, replace
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", nargs="*", metavar="KIND:K",
                   help="kill points (step:3 write:5 rename:2); default: every event of every kind")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        counts = count_events(tmp / "reference")
        reference = _outcome(tmp / "reference" / "run")
        points = ([(kind, int(k)) for kind, k in (x.split(":") for x in args.points)] if args.points
                  else [(kind, k) for kind in KINDS for k in range(1, counts[kind] + 1)])
        print(f"fault_inject: the run has {counts['step']} steps, {counts['write']} file writes, "
              f"{counts['rename']} renames; {len(points)} kill points", flush=True)
        results = {}
        for kind, k in points:
            results[(kind, k)] = run_point(kind, k, tmp / f"{kind}{k}", reference)
            print(f"  {kind}:{k}  {results[(kind, k)]}", flush=True)
    killed = [r for r in results.values() if r != "not reached"]
    bad = [f"{kind}:{k} {r}" for (kind, k), r in results.items() if r not in ("ok", "not reached")]
    print(f"fault_inject: {len(killed)} runs killed and resumed, {len(killed) - len(bad)} equal to the run never "
          f"killed with the user's files unchanged, {len(bad)} not")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
