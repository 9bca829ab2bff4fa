"""The run's record in its output folder: what process 0 writes after each epoch (``last.pt``,
``best.pt``, the kept ``epoch-NNNN.pt``, ``metrics.jsonl``, ``curves.png``), ``summary.json`` at the
end, and, on a resume, what a run killed mid-epoch-end left unwritten.

``Trainer`` decides what an epoch computes and hands its state here; this module decides which files
hold it. Pipelines write their weights as shard folders: each checkpoint file names its folder, and
a folder that no file names any more is removed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import AugLocalError
from ..runtime.checkpoint import read_checkpoint
from .build import Run
from .config import TrainRecipe
from .report import plot_curves, write_metrics
from .run_folder import EPOCHS, drop_unused_shards
from .state import copy_checkpoint, save_training

__all__ = ["RunRecord"]


def _saved_train(path: Path) -> dict | None:
    """A checkpoint's payload without its weights, or None where it is unreadable (a resume from
    best.pt because last.pt is corrupt must not fail on last.pt)."""
    try:
        return read_checkpoint(path, weights=False)
    except AugLocalError:
        return None


class RunRecord:
    """The files of run ``recipe`` (net and model keywords in ``run``; ``averaged``: best.pt holds
    the ema_decay weights) in ``out``."""

    def __init__(self, out: Path, recipe: TrainRecipe, run: Run, averaged: bool, log=print):
        self.out, self.recipe, self.run, self.averaged, self.log = out, recipe, run, averaged, log
        self.shards: dict = {}  # the shard folder each checkpoint file names (pipelines)

    def read_shards(self, saved: dict) -> None:
        """The shard folders the resumed checkpoint and the folder's other checkpoints name: they stay."""
        self.shards = {"last.pt": saved.get("shards")}
        if saved.get("shards"):
            for kept in [self.out / "best.pt", *self.out.glob(EPOCHS)]:
                if kept.is_file():
                    self.shards[kept.name] = (_saved_train(kept) or {}).get("shards")

    def resumed(self, saved: dict, path: Path, epoch: int, history: list[dict]) -> None:
        """Said before it happens: the epochs a resume from an earlier checkpoint trains again; and, from
        last.pt, the files the killed run had not written yet."""
        self._say_what_is_retrained(path, epoch)
        if path.resolve() == (self.out / "last.pt").resolve():
            self._finish_writes(saved, history)

    def _finish_writes(self, saved: dict, history: list[dict]) -> None:
        """What a run killed after writing last.pt but before the epoch's other files leaves
        behind, finished from the checkpoint (the run's record): best.pt where the saved epoch was
        the best and best.pt is missing or older, and metrics.jsonl / curves.png as the history says."""
        t, split = saved["train"], "val" if self.run.val_loader is not None else "test"
        if not history:
            return
        accs = [h[f"{split}_acc"] for h in history]
        best_epoch = history[accs.index(max(accs))]["epoch"]  # the first of equals, as write_epoch keeps it
        best = self.out / "best.pt"
        held = (_saved_train(best) or {}).get("train", {}).get("epoch")  # None: missing or unreadable
        if best_epoch == t["epoch"] and held != best_epoch:
            self._write_best(dict(t), saved.get("shards"))
            self.log(f"note: wrote {best} from last.pt (epoch {best_epoch}): the run stopped before it was written")
        write_metrics(self.out / "metrics.jsonl", history)
        self._plot(history)

    def _say_what_is_retrained(self, path: Path, epoch: int) -> None:
        """Resuming from an earlier epoch than the folder's last.pt (from best.pt, or a copy) trains
        those epochs again and replaces last.pt."""
        last = self.out / "last.pt"
        if not last.is_file() or path.resolve() == last.resolve():
            return
        done = (_saved_train(last) or {}).get("train", {}).get("epoch", 0)  # an unreadable last.pt: nothing to say
        if done > epoch:
            ahead = min(done, self.recipe.epochs)
            self.log(f"note: {last} holds epoch {done}; resuming from {path.name} (epoch {epoch}) trains epochs "
                     f"{epoch + 1}-{ahead} again and replaces it (resume from last.pt to go on from epoch {done})")

    def write_epoch(self, train: dict, shards, improved: bool) -> None:
        """The end of epoch ``train["epoch"]``: last.pt (``train``: its training state), best.pt when
        ``improved``, the kept epochs, the metrics and the plot."""
        history = train["history"]
        save_training(self.run.net, self.out / "last.pt", train, self.run.model_kwargs, shards)
        self.shards["last.pt"] = shards
        if improved:
            self._write_best(train, shards)
        if self.recipe.keep_checkpoints:
            self._keep_epoch(train["epoch"], shards)
        if shards is not None:
            drop_unused_shards(self.out, set(self.shards.values()))
        write_metrics(self.out / "metrics.jsonl", history)
        self._plot(history)

    def _keep_epoch(self, epoch: int, shards) -> None:
        """``keep_checkpoints: N``: this epoch's last.pt kept as epoch-NNNN.pt, and only the N newest
        epochs up to this one (their shard folders stay while they are kept); files of later epochs
        are from a timeline this run left (it resumed from an earlier epoch): gone too."""
        name = f"epoch-{epoch:04d}.pt"
        copy_checkpoint(self.out / "last.pt", self.out / name)
        self.shards[name] = shards
        kept = sorted((int(p.name[6:-3]), p) for p in self.out.glob(EPOCHS))
        for number, old in kept:
            if number > epoch or number <= epoch - self.recipe.keep_checkpoints:
                old.unlink(missing_ok=True)
                self.shards.pop(old.name, None)

    def _write_best(self, train: dict, shards) -> None:
        """best.pt for the epoch last.pt holds (``train``: its training state)."""
        r = self.run
        if shards is not None:  # the same shards; the file says which weights are the net's
            save_training(r.net, self.out / "best.pt", train, r.model_kwargs, shards,
                          "ema" if self.averaged else "model")
            self.shards["best.pt"] = shards
        elif self.averaged:  # best.pt holds what was evaluated: the averaged weights
            live = {k: v.clone() for k, v in r.net.state_dict().items()}
            for unit, state in zip(r.net.local_units(), train["ema"]):
                unit.load_state_dict(state)
            save_training(r.net, self.out / "best.pt", train, r.model_kwargs, weights="ema")
            r.net.load_state_dict(live)
        else:
            copy_checkpoint(self.out / "last.pt", self.out / "best.pt")

    def _plot(self, history: list[dict]) -> None:
        plot_curves(self.out / "curves.png", history,
                    f"{self.recipe.model.label} · {self.recipe.conversion.rule} · {len(self.run.net.blocks)} blocks")

    def summary(self, split: str, chosen: dict | None, epoch: int, history: list[dict], write: bool) -> dict:
        """What the run ends with: the test accuracy of the checkpoint chosen on validation (or, without
        a validation split, of the last epoch, with the best epoch's beside it); written as
        summary.json when ``write``."""
        net, last = self.run.net, history[-1] if history else {}
        best = max(history, key=lambda h: h[f"{split}_acc"]) if history else {}
        summary = {"model": self.recipe.model.label, "rule": self.recipe.conversion.rule,
                   "blocks": len(net.blocks), "epochs_done": epoch, "epochs": self.recipe.epochs,
                   "selected_on": split, "best_epoch": best.get("epoch"), f"best_{split}_acc": best.get(f"{split}_acc")}
        if chosen is not None:  # the test set, once, on best.pt
            summary.update(test_acc=chosen["acc"], test_loss=chosen["loss"], aux_test_acc=chosen["aux_acc"])
        else:
            summary.update(test_acc=last.get("test_acc"), aux_test_acc=last.get("aux_test_acc"))
        summary.update({"backbone_params": sum(p.numel() for p in net.model.parameters()),
                        "aux_params": sum(p.numel() for p in net.aux.parameters()),
                        "train_time_s": sum(h["epoch_time_s"] for h in history),
                        "output": str(self.out)})
        if write:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
