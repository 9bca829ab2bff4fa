"""Peak resident memory per phase of every training process: where a run's memory goes.

    AUGLOCAL_RSS_PHASES=/tmp/rss PYTHONPATH=tools/rss_phases OMP_NUM_THREADS=1 \\
        python tools/bench_pipeline.py --stages 2 --only "sequential x1" "pipeline 2" ...
    python tools/rss_phases/sitecustomize.py /tmp/rss        # the table, one block per process

Python imports ``sitecustomize`` from its path at start-up, so every process started with this
folder on ``PYTHONPATH`` (torchrun's workers, bench_pipeline's and bench_accuracy's children too)
runs this module. With ``AUGLOCAL_RSS_PHASES`` set it samples the process's resident size every 2 ms
in a thread, and at each unit label's start and end, and keeps the peak of each phase: the trainer's
steps (building and converting the net, ``attach`` a pipeline stage, each epoch's training,
evaluation, checkpoint) and inside training the units' labels (``auglocal.forward`` / ``backward`` /
``optimizer`` / ``hand_on``, as ``torch.profiler`` sees them). Peak RSS as the trainer reports it
(``peak_rss_gib``) is the largest of these; this says in which phase it was reached. Written every
half second to ``<dir>/rss-<rank>-<pid>.tsv`` (atomically), so a process killed or ending with
``os._exit`` leaves its figures. A probe: it runs Python in a thread beside training, so time
figures taken with it on are not the run's. Train with ``host_memory: release`` under it: kept (the
default), freed memory stays resident, so a phase's peak is what was ever held by then rather than
what that phase needs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _Probe:
    def __init__(self, folder: str):
        self.path = os.path.join(folder, f"rss-{os.environ.get('RANK', 'main')}-{os.getpid()}.tsv")
        os.makedirs(folder, exist_ok=True)
        self.visit, self.phase, self.label = 0, "start-up", "-"
        self.peaks: dict[tuple, int] = {}  # (visit, phase, label) -> peak bytes, in the order first seen
        self.lock = threading.Lock()

    def enter(self, phase: str) -> str:
        prev, self.phase = self.phase, phase
        self.visit += 1
        return prev

    def leave(self, prev: str) -> None:
        """Back in the enclosing phase, as a new visit (its peak after the inner one apart)."""
        self.visit += 1
        self.phase = prev if prev != "start-up" else "the run's loop"

    def write(self) -> None:
        from auglocal_fx.atomic import atomic_write_text

        with self.lock:  # a snapshot: the training thread may add a label's row meanwhile
            peaks = list(self.peaks.items())
        rows = [f"{v}\t{p}\t{lab}\t{b / 2**30:.3f}" for (v, p, lab), b in peaks]
        atomic_write_text(self.path, "visit\tphase\tlabel\tpeak_gib\n" + "\n".join(rows) + "\n")

    def note(self) -> None:
        key, rss = (self.visit, self.phase, self.label), _rss()
        with self.lock:  # the sampler and the training thread both note: keep the larger
            if rss > self.peaks.get(key, 0):
                self.peaks[key] = rss

    def sample(self) -> None:
        last = 0.0
        while True:
            self.note()
            time.sleep(0.002)
            if time.monotonic() - last > 0.5:
                last = time.monotonic()
                self.write()

    def install(self) -> None:
        """Mark the trainer's phases and the units' profiler labels; sample in a thread."""
        import auglocal_fx.runtime.blockwise as blockwise
        from auglocal_fx.training import pipeline_stages, trainer

        labelled = blockwise.record_function

        @contextlib.contextmanager
        def record_function(name):
            # noted on entry and exit too: a label shorter than the sampler's period (a small
            # unit's forward, or the sampler kept off the GIL) still gets its row
            prev, self.label = self.label, name
            self.note()
            try:
                with labelled(name):
                    yield
            finally:
                self.note()
                self.label = prev

        blockwise.record_function = record_function
        for cls, names in ((trainer.Trainer, ("_start", "train_epoch", "evaluate", "_save")),
                           (pipeline_stages.PipelineStages, ("attach", "checkpoint"))):
            for name in names:
                self._wrap(cls, name)
        threading.Thread(target=self.sample, name="rss-phases", daemon=True).start()

    def _wrap(self, cls, name: str) -> None:
        method, phase = getattr(cls, name), f"{cls.__name__}.{name}"

        def marked(*args, **kwargs):
            prev = self.enter(phase)
            try:
                return method(*args, **kwargs)
            finally:
                self.leave(prev)

        setattr(cls, name, marked)


def report(folder: str) -> str:
    """Per process, each phase's peak in the order the phases ran, and the unit label at which a
    training phase peaked."""
    out = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".tsv"):
            continue
        with open(os.path.join(folder, name)) as f:
            rows = [line.split("\t") for line in f.read().splitlines()[1:] if line]
        phases: list[list] = []  # [visit, phase, peak, label at peak]
        for visit, phase, label, gib in rows:
            g = float(gib)
            if phases and phases[-1][0] == visit:
                if g > phases[-1][2]:
                    phases[-1][2:] = [g, label]
            else:
                phases.append([visit, phase, g, label])
        out.append(f"{name[:-4]}: peak {max((p[2] for p in phases), default=0):.2f} GiB")
        for _, phase, g, label in phases:
            out.append(f"  {g:6.2f} GiB  {phase}" + (f"  (at {label})" if label != "-" else ""))
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        print("usage: python tools/rss_phases/sitecustomize.py FOLDER (the AUGLOCAL_RSS_PHASES folder of a run)",
              file=sys.stderr)
        sys.exit(2)
    print(report(sys.argv[1]))
elif os.environ.get("AUGLOCAL_RSS_PHASES"):
    _Probe(os.environ["AUGLOCAL_RSS_PHASES"]).install()
