"""``train(recipe)``: what ``auglocal-train`` runs, in one process or in each under torchrun.

``Trainer`` runs the epochs of block-wise steps and evaluates every head; what it writes after each
epoch (checkpoints, metrics, the plot) and at the end is ``run_record.py``'s. It is composed with a strategy (``strategies.py``) that says how the units are laid
out over the processes (all here, data-parallel; or one pipeline stage here); nothing is shared
by inheritance. Each epoch ends with ``last.pt`` written atomically (and ``best.pt`` when the
accuracy improved), so a crash loses at most the epoch in progress; ``resume=`` continues from
such a file with the same losses as an unbroken run.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ..atomic import atomic_write_text
from ..errors import AugLocalError, AugLocalWarning
from ..options import word_options
from ..plan import Plan
from ..runtime.blockwise import blockwise_step
from ..runtime.bundles import call
from ..runtime.graphs import CapturedStep
from ..runtime.host_memory import keep_freed_host_memory
from ..runtime.memory import peak_rss_bytes
from ..runtime.offload import AuxOffload
from ..runtime.overlap import overlapped_step
from .build import Run, build_run
from .config import RECIPE_KEYS, TrainRecipe
from .distributed import Env, barrier, gather_states, setup, teardown
from .loss_window import LossWindow
from .metrics import Sums
from .optim import build_optimizer, build_scheduler
from .preflight import in_recipe_words
from .report import EpochProgress, epoch_line
from .resume_checks import check_resume
from .run_folder import (
    MARKER,
    RunLock,
    check_run_folder,
    check_writable,
    clear_run,
    clear_stale_temps,
)
from .run_record import RunRecord
from .state import read_training, rng_state, set_rng_state
from .strategies import make_strategy
from .techniques import (
    Mixing,
    UnitEma,
    check_techniques,
    loss_function,
    tensorboard_writer,
    write_scalars,
)

__all__ = ["Trainer", "train"]


def train(recipe: TrainRecipe, resume=None, stop_after: int | None = None, log=print,
          overwrite: bool = False) -> dict | None:
    """Train ``recipe`` (resuming from checkpoint ``resume``); returns the summary dict.

    An output folder that holds another run's checkpoint is refused unless ``overwrite`` (which
    deletes that run's files first) or ``resume`` continues it. Under torchrun each process calls
    this; process 0 prints, writes files and gets the summary (the other ranks get None).
    """
    # every rank, before any work: all refuse alike
    check_run_folder(recipe.output, resume, overwrite, source=getattr(recipe, "source", None))
    env = setup(recipe.device)
    trainer = None
    try:
        with in_recipe_words(recipe):  # the library names its parameters; a recipe user knows the keys
            trainer = Trainer(recipe, env, resume=resume, log=log, overwrite=overwrite)
            summary = trainer.fit(stop_after)
        return summary if env.is_main else None
    finally:
        if trainer is not None:
            trainer.release()
        teardown(env)


class Trainer:
    """One process's share of a run: the units ``strategy`` gives it (default: from the recipe's
    ``parallel`` section), trained epoch by epoch."""

    def __init__(self, recipe: TrainRecipe, env: Env, strategy=None, resume=None, log=print,
                 overwrite: bool = False):
        self.recipe, self.env = recipe, env
        self.log = log if env.is_main else (lambda *a, **k: None)
        self.out = Path(recipe.output)
        self.lock: RunLock | None = None  # the run folder's, held by process 0 while the run writes there
        created = not self.out.exists()
        try:
            self.strategy = strategy if strategy is not None else make_strategy(recipe, env)
            self._start(resume, overwrite)
        except BaseException:  # a run that did not start leaves no folder behind it made
            self.release()
            if created and env.is_main and self.out.is_dir() and {p.name for p in self.out.iterdir()} <= {MARKER}:
                (self.out / MARKER).unlink(missing_ok=True)
                self.out.rmdir()
            raise

    def release(self) -> None:
        """Let go of the run folder's lock (the run ended, or did not start)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _place(self, module: torch.nn.Module) -> None:
        """Put ``module`` on the run's device (a pipeline stage: once it holds only its units; the
        other stages' tensors stay on the meta device, which ``Module.to`` would refuse)."""
        device, channels_last = self.env.device, self.recipe.channels_last

        def place(t: torch.Tensor) -> torch.Tensor:
            if t.device.type == "meta":
                return t
            t = t.to(device)
            return t.to(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t  # Mixing: inputs

        module._apply(place)

    def _start(self, resume, overwrite: bool) -> None:
        recipe, env, strategy = self.recipe, self.env, self.strategy
        if env.is_main:
            check_writable(self.out)
            self.lock = RunLock(self.out, {"recipe": str(getattr(recipe, "source", None) or ""),
                                           "model": recipe.model.label, "resume": str(resume or "")})
            clear_stale_temps(self.out)  # a killed run's half-written files (never the finished ones)
            if overwrite and resume is None:
                clear_run(self.out)
        if recipe.threads is not None:
            torch.set_num_threads(recipe.threads)
        if recipe.host_memory == "keep":
            keep_freed_host_memory()
        check_techniques(recipe, recipe.batch_size // strategy.data_env.world, env)
        saved = read_training(resume, weights=False) if resume else None  # weights: read by the strategy
        free = check_resume(saved["train"]["recipe"], recipe, resume) if saved is not None else []
        if free:  # how the run goes, not what it computes
            self.log(f"resuming with {'; '.join(free)}")
        self.log(f"building {recipe.model.label} ({recipe.conversion.rule}) ...", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AugLocalWarning)  # the plan's notes are logged below, as recipe keys
            self.run: Run = build_run(recipe, strategy.data_env, Plan.from_dict(saved["plan"]) if saved else None,
                                      lazy_aux=strategy.lazy_aux)
        r = self.run
        for note in r.net.plan.notes:
            self.log(f"note: {word_options(note, RECIPE_KEYS)}")
        self.autocast = torch.bfloat16 if recipe.bf16 else None
        self.units = strategy.attach(r.net.local_units(), r.net, recipe, saved, self.autocast, self.log, self._place)
        classes = r.net.plan.head.out_shape[-1] if r.net.plan.head.out_shape else r.data.classes
        self.classes, self._labels_checked = classes, False
        self.mixing, self.loss_fn = Mixing(recipe, classes, env.device), loss_function(recipe)
        self.ema = UnitEma(self.units, recipe.ema_decay) if recipe.ema_decay else None
        self.captured: CapturedStep | None = None  # cuda_graphs: made on the first batch, kept for the run
        self.offload: AuxOffload | None = None  # offload: aux, made at the first step (after a resume's load)
        r.optimizer = build_optimizer(self.units, strategy.parameters(r.net, self.units), recipe.optimizer, env.device)
        r.scheduler = build_scheduler(r.optimizer, recipe.schedule, recipe.epochs, len(r.train_loader))
        self.epoch, self.history, self.best = 0, [], -1.0
        self.record = RunRecord(self.out, recipe, r, self.ema is not None, self.log)
        if saved is not None:
            self._restore(saved, resume)
        else:
            # augmentation, dropout and mixup (numpy's generator) differ per rank, the same every run
            self._seed(recipe.seed + 1_000_003 * env.rank)
        if env.is_main:
            atomic_write_text(self.out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        self.writer = tensorboard_writer(self.out) if recipe.tensorboard and env.is_main else None

    @staticmethod
    def _seed(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _restore(self, saved: dict, path) -> None:
        r, t = self.run, saved["train"]
        if saved.get("weights") == "ema":
            raise AugLocalError(f"cannot resume from {path}: it holds the averaged weights (ema_decay), not the ones "
                                f"training continues from; resume from {Path(path).with_name('last.pt')}")
        # refuses another layout first; then weights, averages, optimizer and schedule
        self.strategy.restore(r.net, self.units, r.optimizer, r.scheduler, self.ema, saved, path)
        self.record.read_shards(saved)
        self.epoch, self.history, self.best = t["epoch"], list(t["history"]), t["best_acc"]
        if self.env.rank < len(t["rng"]):
            set_rng_state(t["rng"][self.env.rank])
        else:  # more processes than the run had: the new ones draw their own streams
            self._seed(self.recipe.seed + 1_000_003 * self.env.rank)
        self.log(f"resumed from epoch {self.epoch}")
        if self.env.is_main:
            self.record.resumed(saved, Path(path), self.epoch, self.history)

    # -- one epoch -------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        r, s, recipe = self.run, self.strategy, self.recipe
        loader, device = r.train_loader, self.env.device
        loader.sampler.set_epoch(epoch)
        loader.generator.manual_seed(recipe.seed * 7919 + epoch * 104729 + s.data_env.rank)
        r.net.train()
        m, steps = len(r.net.blocks), len(loader)
        world = self.env.world
        sums = Sums({"loss": m, "correct": 1, "images": 1, "step_loss": steps, "step_images": steps, "seconds": 1,
                     "peak_rss": world, "peak_allocated": world, **s.metric_sizes()}, device)
        window = LossWindow(s, device, self._check_finite, sums, epoch,
                            EpochProgress(f"epoch {epoch}/{recipe.epochs}{s.title}", steps, s.shows_progress))
        interval = recipe.log_interval
        per_unit = recipe.optimizer.per_unit
        s.start_epoch()
        busy, start = 0.0, time.perf_counter()
        try:  # the bar goes away even when a step raises (non-finite loss, Ctrl-C)
            for step, (h, y, image) in enumerate(s.batches(loader, lambda x, y: self.mixing(x, y, True)), 1):
                t0 = time.perf_counter()
                if not self._labels_checked:  # one look at the host, at the first step
                    self._check_labels(y)
                try:
                    out = self._step(h, y, image)
                except IndexError as exc:  # cross-entropy's "Target N is out of bounds", on the CPU
                    if "out of bounds" not in str(exc):
                        raise
                    self._check_labels(y)
                    raise
                if not per_unit:
                    r.optimizer.step()
                    r.optimizer.zero_grad(set_to_none=True)
                r.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.units)
                busy += time.perf_counter() - t0
                window.add(step, out, y, h if image is None else image)
                if step % interval == 0 or step == steps:
                    window.close(step)
        finally:
            window.bar.close()
        wall = time.perf_counter() - start
        s.end_epoch(sums, busy, wall)
        if s.has_head:
            sums.add("seconds", wall)
        # each process's peak memory so far: resident (KiB on Linux) and, on a GPU, the allocator's
        sums.add("peak_rss", peak_rss_bytes() / 2**30, self.env.rank)
        if device.type == "cuda":
            sums.add("peak_allocated", torch.cuda.max_memory_allocated(device) / 2**30, self.env.rank)
        red = sums.reduce()  # the epoch's one all_reduce over every process
        n = red["images"][0]
        seconds = red["seconds"][0] / s.data_env.world  # the processes that end the epoch, averaged
        return {"epoch": epoch, "train_loss": red["loss"][m - 1] / n, "train_acc": red["correct"][0] / n,
                "local_losses": [v / n for v in red["loss"][:m - 1]],
                "step_losses": [a / b for a, b in zip(red["step_loss"], red["step_images"])],
                "lr": float(r.optimizer.param_groups[0]["lr"]),  # float(): a tensor under cuda_graphs
                "images_per_s": n / seconds, "epoch_time_s": seconds,
                "peak_rss_gib": red["peak_rss"], **({"peak_allocated_gib": red["peak_allocated"]}
                                                    if device.type == "cuda" else {}),
                **s.record(red)}

    def _check_labels(self, y: torch.Tensor) -> None:
        """Class labels within the model's scores (a label past them fails inside the loss, on a GPU
        as a device assert the run cannot recover from)."""
        self._labels_checked = True
        if y.is_floating_point() or y.numel() == 0:  # mixup's soft targets, made from checked labels
            return
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= self.classes:
            bad = high if high >= self.classes else low
            raise AugLocalError(f"a training label is {bad} but the model gives {self.classes} class scores (labels 0 "
                                f"to {self.classes - 1}); fix {self.recipe.data.dataset}'s labels, or give the model at "
                                f"least {high + 1} outputs (model.num_classes)")

    def _step(self, h, y, image):
        """One training step as the recipe schedules it: every unit replayed as a CUDA graph
        (``cuda_graphs``, captured at the first batch's shape after warm-up steps), or block by block,
        overlapped on two streams (``overlap``) or in turn, with the aux nets in host memory
        (``offload``, set up at the first step, after a resume's load). Per unit (``optimizer.per_unit``)
        each unit's optimizer steps right after its backward; else the caller steps it after."""
        r, recipe, s = self.run, self.recipe, self.strategy
        opt = r.optimizer if recipe.optimizer.per_unit else None
        if recipe.cuda_graphs:
            if self.captured is None:
                self.captured = CapturedStep(self.units, r.optimizer, (h, y), loss_fn=self.loss_fn,
                                             autocast_dtype=self.autocast, clip_grad=recipe.clip_grad, log=self.log)
            return self.captured(h, y)
        if recipe.offload == "aux" and self.offload is None:
            self.offload = AuxOffload(self.units, r.optimizer, self.env.device)
        if recipe.overlap:
            return overlapped_step(self.units, h, y, self.loss_fn, self.autocast, opt, image, sync=False,
                                   clip_grad=recipe.clip_grad, offload=self.offload)
        return blockwise_step(self.units, h, y, self.loss_fn, self.autocast, None, opt, image=image,
                              hand_on=s.hand_on(y, image), sync=False, clip_grad=recipe.clip_grad, offload=self.offload)

    def _check_finite(self, value: float, block: int, epoch: int, step: int, bad_input: bool = False) -> None:
        if not math.isfinite(value):
            kept = f"{self.out / 'last.pt'} holds epoch {self.epoch}" if self.epoch else "no checkpoint yet"
            if bad_input:  # the data, not the optimizer: a lower learning rate would not help
                raise AugLocalError(f"the input batch of epoch {epoch} step {step} holds NaN or inf values, so the "
                                    f"loss of block {block} became {value}; stopped ({kept}); check the dataset "
                                    "and its transforms (a division by a zero std, a corrupt file)")
            raise AugLocalError(f"loss of block {block} became {value} at epoch {epoch} step {step}; stopped "
                                f"({kept}); lower optimizer.lr or add schedule.warmup_epochs")

    @torch.no_grad()
    def evaluate(self, loader=None, units: list | None = None) -> dict:
        """``acc``, ``loss`` of the final head and ``aux_acc`` of every aux head on ``loader`` (default:
        the test set), one pass through the blocks, with ``units`` (default: the averaged ones under
        ``ema_decay``, else the trained ones); under a pipeline the batches stream through the stages
        as in training."""
        r, s = self.run, self.strategy
        r.net.eval()
        if units is None:
            units = self.ema.units if self.ema is not None else self.units
        units = [getattr(u, "module", u) for u in units]
        for u in units:
            u.eval()
        amp = torch.autocast(self.env.device.type, self.autocast) if self.autocast else nullcontext()
        m = len(r.net.blocks)
        sums = Sums({"correct": m, "loss": 1, "images": 1}, self.env.device)
        with self.offload.resident() if self.offload is not None else nullcontext():  # every aux head runs
            self._evaluate(s, loader, units, amp, sums)
        s.flush()
        red = sums.reduce()
        n = max(red["images"][0], 1)
        return {"acc": red["correct"][m - 1] / n, "loss": red["loss"][0] / n,
                "aux_acc": [c / n for c in red["correct"][:m - 1]]}

    def _evaluate(self, s, loader, units: list, amp, sums) -> None:
        """``evaluate``'s pass over ``loader``, adding into ``sums``."""
        r = self.run
        for h, y, image in s.batches(r.test_loader if loader is None else loader, lambda x, y: self.mixing(x, y, False)):
            with amp:
                for i, unit in zip(s.mine, units):
                    h, top = call(unit, h)
                    logits = unit.logits(top)
                    sums.add("correct", (logits.argmax(1) == y).sum(), i)
            if s.has_head:
                sums.add("loss", F.cross_entropy(logits.float(), y, reduction="sum"))
                sums.add("images", len(y))
            else:
                s.hand_on(y, image)(h)

    # -- the run ---------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict:
        """Train until ``recipe.epochs`` (or ``stop_after``). ``best.pt`` is chosen on the validation
        split when the run has one (else on the test set, as the record says); the test set is then
        evaluated once, on that checkpoint."""
        r = self.run
        split, loader = ("val", r.val_loader) if r.val_loader is not None else ("test", r.test_loader)
        last_epoch = min(self.recipe.epochs, stop_after or self.recipe.epochs)
        try:
            self._epochs(split, loader, last_epoch)
        finally:
            if self.writer is not None:
                self.writer.close()
        # the test set once, when the run is complete: a cut run (--stop-after) reports validation only
        done = self.history and self.epoch == self.recipe.epochs
        chosen = self._test_chosen() if split == "val" and done else None
        return self.record.summary(split, chosen, self.epoch, self.history, write=self.env.is_main)

    def _epochs(self, split: str, loader, last_epoch: int) -> None:
        start, first = time.perf_counter(), self.epoch + 1
        for epoch in range(self.epoch + 1, last_epoch + 1):
            record = self.train_epoch(epoch)
            found = self.evaluate(loader)
            record.update({f"{split}_acc": found["acc"], f"{split}_loss": found["loss"],
                           f"aux_{split}_acc": found["aux_acc"]})
            self.epoch = epoch
            self.history.append(record)
            improved = record[f"{split}_acc"] > self.best
            self.best = max(self.best, record[f"{split}_acc"])
            self._save(improved)
            if self.writer is not None:
                write_scalars(self.writer, record, epoch)
            # the pace so far, training, evaluation and checkpoints together, times the epochs to go
            per_epoch = (time.perf_counter() - start) / (epoch - first + 1)
            self.log(epoch_line(record, self.recipe.epochs, per_epoch * (self.recipe.epochs - epoch)), flush=True)

    def _test_chosen(self) -> dict:
        """The test set on ``best.pt``'s weights (the checkpoint chosen on validation; the averaged
        weights under ema_decay), read back by every process once process 0 has written it."""
        barrier(self.env)
        if self.offload is not None:
            self.offload.settle()  # the weights load into the aux nets' host copies
        self.strategy.load_weights(self.run.net, self.units, self.out / "best.pt")
        return self.evaluate(units=self.units)

    def _save(self, improved: bool) -> None:
        if self.offload is not None:
            self.offload.settle()  # the aux nets' host copies hold the last update
        rngs = gather_states(rng_state(), self.env)  # every rank's, so a resumed run draws the same
        r = self.run
        train = self.strategy.checkpoint(r.net, self.units, r.optimizer, r.scheduler, self.ema, self.out,
                                         f"epoch-{self.epoch:04d}")
        if train is None:  # not rank 0
            return
        shards = train.pop("shards")
        train.update({"epoch": self.epoch, "rng": rngs, "history": self.history, "best_acc": self.best,
                      "recipe": self.recipe.to_dict()})
        self.record.write_epoch(train, shards, improved)
