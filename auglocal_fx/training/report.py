"""What a run shows and leaves behind: the progress bar, metrics as JSON lines, the curves plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..atomic import atomic_savefig, atomic_write_text

__all__ = ["EpochProgress", "write_metrics", "plot_curves", "epoch_line"]


class EpochProgress:
    """A progress bar on a terminal (loss, accuracy, images/s); in logs, a line per log interval."""

    def __init__(self, title: str, total: int, enabled: bool = True):
        self.title, self.total, self.enabled = title, total, enabled
        self.console = Console(stderr=True)
        self.start = time.perf_counter()
        self._bar = None
        if enabled and self.console.is_terminal:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=True)
            self._task = self._bar.add_task(title, total=total, stats="")
            self._bar.start()

    def update(self, step: int, loss: float | None = None, acc: float | None = None, images: int = 0) -> None:
        """Step ``step`` done; with ``loss`` (the trainer looks at the losses once per log interval)
        the bar's figures change too, and a log gets a line."""
        if not self.enabled:
            return
        if loss is None:
            if self._bar is not None:
                self._bar.update(self._task, completed=step)
            return
        rate = images / max(time.perf_counter() - self.start, 1e-9)
        stats = f"loss {loss:.4f}  acc {100 * acc:.1f}%  {rate:,.0f} img/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)
        else:
            print(f"{self.title} {step}/{self.total}  {stats}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def held_out_split(r: dict) -> str:
    """The split an epoch was evaluated on: "val" when the run has a validation split, else "test"."""
    return "val" if "val_acc" in r else "test"


def epoch_line(r: dict, epochs: int, eta_s: float | None = None) -> str:
    """An epoch on the console: losses and accuracies, the held-out loss, the learning rate, speed,
    the largest process's peak memory (resident, and the device's on CUDA) and, with ``eta_s``,
    the time the run's remaining epochs will take at this pace."""
    split = held_out_split(r)
    aux = r.get(f"aux_{split}_acc") or []
    aux_txt = f"  aux heads {' '.join(f'{100 * a:.1f}' for a in aux)}" if aux else ""
    held_loss = f" loss {r[f'{split}_loss']:.4f}" if r.get(f"{split}_loss") is not None else ""
    memory = ""
    if r.get("peak_rss_gib"):
        memory = f"  peak RSS {max(r['peak_rss_gib']):.2f} GiB"
        if r.get("peak_allocated_gib"):
            memory += f", device {max(r['peak_allocated_gib']):.2f} GiB"
    eta = f"  ETA {_duration(eta_s)}" if eta_s is not None and r["epoch"] < epochs else ""
    return (f"epoch {r['epoch']}/{epochs}  train loss {r['train_loss']:.4f} acc {100 * r['train_acc']:.2f}%  "
            f"{split}{held_loss} acc {100 * r[f'{split}_acc']:.2f}%{aux_txt}  lr {r['lr']:.3g}  "
            f"{r['images_per_s']:,.0f} img/s  {r['epoch_time_s']:.0f}s{memory}{eta}")


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def write_metrics(path: Path, history: list[dict]) -> None:
    """The whole history, one JSON object per epoch, rewritten atomically (never a torn last line)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def plot_curves(path: Path, history: list[dict], title: str) -> None:
    """Training loss and held-out accuracy per epoch (validation, else test; final head bold, aux
    heads faint) as a PNG."""
    import matplotlib  # imported here: heavy, and needed only at the end of an epoch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    # every step's loss, so even a one-epoch run draws a curve; the epoch means on top
    xs, ys = [], []
    for r in history:
        n = len(r.get("step_losses") or [])
        xs += [r["epoch"] - 1 + (i + 1) / n for i in range(n)]
        ys += r.get("step_losses") or []
    if ys:
        ax_loss.plot(xs, ys, lw=0.8, alpha=0.5, color="tab:blue", label="final loss per step")
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", color="tab:blue", label="final loss")
    for i in range(len(history[-1].get("local_losses") or [])):
        ax_loss.plot(epochs, [r["local_losses"][i] for r in history], marker=".", alpha=0.35, lw=1,
                     color="tab:orange", label="local losses (epoch mean)" if i == 0 else None)
    ax_loss.set(xlabel="epoch", ylabel="train loss")
    split = held_out_split(history[-1])
    ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in history], marker="o", color="tab:blue", label="final head")
    for i in range(len(history[-1].get(f"aux_{split}_acc") or [])):
        ax_acc.plot(epochs, [100 * r[f"aux_{split}_acc"][i] for r in history], marker=".", alpha=0.35, lw=1,
                    color="tab:orange", label="aux heads" if i == 0 else None)
    ax_acc.set(xlabel="epoch", ylabel=f"{'validation' if split == 'val' else 'test'} accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, path)

