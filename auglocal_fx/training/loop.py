"""The training loop: block-wise steps, per-epoch evaluation of every head, checkpoints, metrics, plot.

``Trainer`` is what ``auglocal-train`` runs (``launch.train``). Each epoch ends with ``last.pt`` written
atomically (and ``best.pt`` when the test accuracy improved), so a crash loses at most the epoch
in progress; ``resume=`` continues from such a file with the same losses as an unbroken run.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from ..atomic import atomic_write_text
from ..errors import AugLocalError, AugLocalWarning
from ..options import word_options
from ..plan import Plan
from .build import Run, build_run
from .config import RECIPE_KEYS, TrainRecipe
from .distributed import Env, all_reduce_sum, gather_states, wrap_units
from .report import EpochProgress, epoch_line, plot_curves, write_metrics
from .state import copy_checkpoint, read_training, rng_state, save_training, set_rng_state

__all__ = ["Trainer", "check_run_folder"]

CHECKPOINTS = ("last.pt", "best.pt")
# every file a run writes; --overwrite clears them so that the folder never mixes two runs
RUN_FILES = (*CHECKPOINTS, "metrics.jsonl", "curves.png", "summary.json", "recipe.yaml")
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
    held = [name for name in CHECKPOINTS if (out / name).is_file()]
    if overwrite or not held:
        return
    if resume is not None and Path(resume).resolve().parent == out.resolve():
        return
    cont, elsewhere, replace = _WORDS[words]
    cont = cont.format(last=str(out / held[0]))
    raise AugLocalError(f"output folder {out} already holds a run ({', '.join(held)}); continue it with {cont}, "
                        f"write to {elsewhere}, or pass {replace} to replace it")


def _check_inputs_kept(out: Path, inputs) -> None:
    """A run never writes over its own input: a recipe saved as ``<output>/recipe.yaml`` would be
    replaced by the filled-in copy the run writes there (comments gone), even with ``overwrite``."""
    written = {(out / name).resolve(): name for name in RUN_FILES if name not in CHECKPOINTS}
    for given in inputs:
        if given is not None and Path(given).resolve() in written:
            raise AugLocalError(f"{given} is an input of this run, and the run writes {written[Path(given).resolve()]} "
                                f"in its output folder {out}: rename the recipe or write to another folder "
                                "(recipe key output)")


def _clear_run(out: Path) -> None:
    """Delete the files of the run ``out`` holds (``overwrite``): a crash in the new run's first epoch
    must not leave the old ``last.pt`` for ``--resume auto`` to continue under the new recipe."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".auglocal-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise AugLocalError(f"output directory {out} is not writable ({exc.strerror}); "
                            "set recipe key output to a writable folder") from exc


def _check_same_model(saved: dict, recipe: TrainRecipe, path) -> None:
    now = recipe.to_dict()
    for section in ("model", "conversion"):
        for key, value in now[section].items():
            if (section, key) == ("conversion", "aux_init"):  # only the start of a run: resuming loads the weights
                continue
            if key in saved.get(section, {}) and saved[section][key] != value:  # keys added since: defaults
                raise AugLocalError(f"cannot resume from {path}: it was trained with {section}.{key} = "
                                    f"{saved.get(section, {}).get(key)!r}, this recipe says {value!r}; use that recipe or "
                                    "a new output folder")
    # a schedule is defined for the run's length: resuming under another one would jump the learning
    # rate (a finished cosine restarting upwards); a longer run starts anew from the weights
    longer = saved.get("epochs") not in (None, now["epochs"]) and now["schedule"]["name"] != "constant"
    changed = [k for k, v in now["schedule"].items() if k in saved.get("schedule", {}) and saved["schedule"][k] != v]
    if longer or changed:
        what = (f"epochs = {saved['epochs']}" if longer else f"schedule.{changed[0]} = {saved['schedule'][changed[0]]!r}")
        raise AugLocalError(f"cannot resume from {path}: its {saved['schedule']['name']} schedule was made for "
                            f"{what}, and this recipe changes it (the learning rate would jump); keep it, or train "
                            f"on from its weights under the new schedule in a new run: --set model.checkpoint={path} "
                            "--set output=<a new folder>")


class Trainer:
    def __init__(self, recipe: TrainRecipe, env: Env, resume=None, log=print, overwrite: bool = False):
        self.recipe, self.env = recipe, env
        self.log = log if env.is_main else (lambda *a, **k: None)
        self.out = Path(recipe.output)
        created = not self.out.exists()
        try:
            self._start(recipe, env, resume, overwrite)
        except BaseException:  # a run that did not start leaves no empty folder behind
            if created and env.is_main and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
            raise

    def _start(self, recipe: TrainRecipe, env: Env, resume, overwrite: bool) -> None:
        if env.is_main:
            _check_writable(self.out)
            if overwrite and resume is None:
                _clear_run(self.out)
        saved = self._saved = read_training(resume) if resume else None
        if saved is not None:
            _check_same_model(saved["train"]["recipe"], recipe, resume)
        self.log(f"building {recipe.model.name} ({recipe.conversion.rule}) ...", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AugLocalWarning)  # the plan's notes are logged below, as recipe keys
            self.run: Run = build_run(recipe, self._data_env(), Plan.from_dict(saved["plan"]) if saved else None)
        net = self.run.net
        for note in net.plan.notes:
            self.log(f"note: {word_options(note, RECIPE_KEYS)}")
        self.amp = dict(autocast_dtype=torch.bfloat16) if recipe.bf16 else {}
        self.units = self._make_units()
        self.epoch, self.history, self.best = 0, [], -1.0
        if saved is not None:
            self._restore(saved)
            self._saved = saved = None  # the checkpoint's tensors are loaded: do not hold a second copy
        else:
            torch.manual_seed(recipe.seed + 1_000_003 * env.rank)  # augmentation/dropout differ per rank
        if env.is_main:
            atomic_write_text(self.out / "recipe.yaml", _yaml(recipe.to_dict()))

    def _data_env(self) -> Env:
        """How the data is split: across all processes here (a pipeline: across its data replicas)."""
        return self.env

    def _make_units(self) -> list:
        """The units this process trains: all of them, each in its own DDP under torchrun."""
        return wrap_units(self.run.net.local_units(), self.env)

    def _restore(self, saved: dict) -> None:
        r, t = self.run, saved["train"]
        if "pipeline" in t:
            p = t["pipeline"]
            raise AugLocalError(f"cannot resume from a {p['stages']}-stage pipeline checkpoint in one pipeline stage; "
                                f"launch {p['stages'] * p['replicas']} processes with --set "
                                f"parallel.pipeline={p['stages']}")
        r.net.model.load_state_dict(saved["model_state"])
        r.net.aux.load_state_dict(saved["aux_state"])
        r.optimizer.load_state_dict(t["optimizer"])
        r.scheduler.load_state_dict(t["scheduler"])
        self.epoch, self.history, self.best = t["epoch"], list(t["history"]), t["best_acc"]
        set_rng_state(t["rng"][self.env.rank] if self.env.rank < len(t["rng"]) else t["rng"][0])
        self.log(f"resumed from epoch {self.epoch}")

    # -- one epoch -------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        r, env, net = self.run, self.env, self.run.net
        r.train_loader.sampler.set_epoch(epoch)
        r.train_loader.generator.manual_seed(self.recipe.seed * 7919 + epoch * 104729 + env.rank)
        net.train()
        sums, steps, images = None, [], 0
        bar = EpochProgress(f"epoch {epoch}/{self.recipe.epochs}", len(r.train_loader), env.is_main)
        start = time.perf_counter()
        try:  # the bar goes away even when a step raises (non-finite loss, Ctrl-C)
            for step, (x, y) in enumerate(r.train_loader, 1):
                x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
                # per unit: the optimizer steps inside, after each unit's backward (its step below is a no-op)
                per_unit = dict(optimizer=r.optimizer) if self.recipe.optimizer.per_unit else {}
                out = net.training_step(x, y, units=self.units, **self.amp, **per_unit)
                n = len(y)
                correct = (out.logits.argmax(1) == y).sum().item()
                vals = all_reduce_sum([v * n for v in [*out.local_losses, out.loss]] + [correct, n], env)
                total = vals[-1]
                losses = [v / total for v in vals[:-2]]
                self._check_finite(losses, epoch, step)
                r.optimizer.step()
                r.optimizer.zero_grad(set_to_none=True)
                r.scheduler.step()
                sums = vals if sums is None else [a + b for a, b in zip(sums, vals)]
                steps.append(losses[-1])
                images += int(total)
                bar.update(step, sums[-3] / sums[-1], sums[-2] / sums[-1], images)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        return {"epoch": epoch, "train_loss": sums[-3] / sums[-1], "train_acc": sums[-2] / sums[-1],
                "local_losses": [s / sums[-1] for s in sums[:-3]], "step_losses": steps,
                "lr": r.optimizer.param_groups[0]["lr"], "images_per_s": images / seconds,
                "epoch_time_s": seconds}

    def _check_finite(self, losses: list[float], epoch: int, step: int, first: int = 0) -> None:
        """``losses`` of blocks ``first``, ``first + 1``, ...: stop at the first that is not finite."""
        for i, value in enumerate(losses, first):
            if not math.isfinite(value):
                kept = f"{self.out / 'last.pt'} holds epoch {self.epoch}" if self.epoch else "no checkpoint yet"
                raise AugLocalError(f"loss of block {i} became {value} at epoch {epoch} step {step}; stopped "
                                    f"({kept}); lower optimizer.lr or add schedule.warmup_epochs")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test accuracy of the final head and of every aux head (one pass through the blocks)."""
        r, env, net = self.run, self.env, self.run.net
        net.eval()
        amp = torch.autocast(env.device.type, torch.bfloat16) if self.recipe.bf16 else nullcontext()
        heads = len(net.aux) + 1
        sums = [0.0] * (heads + 2)  # per-head correct, final loss sum, count
        for x, y in r.eval_loader:
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with amp:
                outs = net.head_outputs(x)
            for i, o in enumerate(outs):
                sums[i] += (o.argmax(1) == y).sum().item()
            sums[-2] += torch.nn.functional.cross_entropy(outs[-1].float(), y, reduction="sum").item()
            sums[-1] += len(y)
        sums = all_reduce_sum(sums, env)
        n = max(sums[-1], 1)
        return {"test_acc": sums[heads - 1] / n, "test_loss": sums[-2] / n,
                "aux_test_acc": [s / n for s in sums[: heads - 1]]}

    # -- the run ---------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict:
        last_epoch = min(self.recipe.epochs, stop_after or self.recipe.epochs)
        for epoch in range(self.epoch + 1, last_epoch + 1):
            record = self.train_epoch(epoch)
            record.update(self.evaluate())
            self.epoch = epoch
            self.history.append(record)
            improved = record["test_acc"] > self.best
            self.best = max(self.best, record["test_acc"])
            self._save(improved)
            self.log(epoch_line(record, self.recipe.epochs), flush=True)
        return self._summary()

    @staticmethod
    def _rng() -> dict:
        return rng_state()

    def _save(self, improved: bool) -> None:
        states = gather_states(self._rng(), self.env)  # every rank's, so a resumed run draws the same
        if not self.env.is_main:
            return
        r = self.run
        train = {"epoch": self.epoch, "optimizer": r.optimizer.state_dict(), "scheduler": r.scheduler.state_dict(),
                 "rng": states, "history": self.history, "best_acc": self.best, "recipe": self.recipe.to_dict()}
        save_training(r.net, self.out / "last.pt", train, r.model_kwargs)
        if improved:
            copy_checkpoint(self.out / "last.pt", self.out / "best.pt")
        self._write_reports()

    def _write_reports(self) -> None:
        write_metrics(self.out / "metrics.jsonl", self.history)
        plot_curves(self.out / "curves.png", self.history,
                    f"{self.recipe.model.name} · {self.recipe.conversion.rule} · {len(self.run.net.blocks)} blocks")

    def _summary(self) -> dict:
        net, last = self.run.net, self.history[-1] if self.history else {}
        best_epoch = max(self.history, key=lambda h: h["test_acc"])["epoch"] if self.history else None
        summary = {"model": self.recipe.model.name, "rule": self.recipe.conversion.rule,
                   "blocks": len(net.blocks), "epochs_done": self.epoch, "epochs": self.recipe.epochs,
                   "test_acc": last.get("test_acc"), "aux_test_acc": last.get("aux_test_acc"),
                   "best_test_acc": self.best if self.history else None, "best_epoch": best_epoch,
                   "backbone_params": sum(p.numel() for p in net.model.parameters()),
                   "aux_params": sum(p.numel() for p in net.aux.parameters()),
                   "train_time_s": sum(h["epoch_time_s"] for h in self.history),
                   "output": str(self.out)}
        if self.env.is_main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def _yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)
