"""Update-unlocked training: the local units split into pipeline stages, one stage per process.

With ``parallel.pipeline: P`` under ``torchrun`` (P x R processes: R data-parallel replicas of
every stage), stage s trains a contiguous group of units (``stages.split_stages``, balanced by
training FLOPs). Stage 0 loads the batches; every stage runs its units' forward, local losses,
backwards and optimizer steps on a batch, and hands the detached boundary tensor (with the labels,
and the input batch for rules that read it) to the next stage as soon as its last unit's forward is
done. Nothing flows backward, and no stage waits for a later one: three stages on batches 1, 2, 3 ...

    stage 0 | F1 B1 | F2 B2 | F3 B3 | F4 B4 | ...
    stage 1 |     F1 B1 | F2 B2 | F3 B3 | ...        F: forward (sends on at its end)
    stage 2 |         F1 B1 | F2 B2 | ...            B: local backward(s) + optimizer step

Why it is exact: sequential ``training_step`` runs unit k on batch n with unit k's parameters after
its step n-1 update, and hands unit k+1 the output computed before unit k's step n update. A stage
does the same: it computes batch n's output with its parameters before their step n update, sends
it, then updates. So stage k+1 receives exactly the tensor the sequential loop would have given
it, and the run computes the same updates (up to floating-point order); batch-norm statistics too,
since every stage sees whole batches. Only random draws inside the model (dropout, drop-path)
differ: each process has its own generator.

Transfers are ``torch.distributed`` ``isend``/``irecv`` (``p2p.py``). ``torch.distributed.pipelining``
(``PipelineStage`` + a schedule) is built for pipelined *backprop*: its schedules run a backward
that sends gradients to the previous stage, and one loss at the last stage; here every stage has its
own losses and optimizer and nothing goes backward, which its schedules do not express.

With R > 1 every stage's units are wrapped in DDP over that stage's R replicas (a process group
each), exactly as the single-stage data-parallel path; replica r of stage s talks to replica r of
stage s + 1. Each process builds the whole net (same seed: same weights) and trains its own units;
checkpoints gather every stage's weights and optimizer state into one file on rank 0.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import AugLocalError
from ..runtime.blockwise import blockwise_step
from ..runtime.bundles import call
from ..runtime.net import unique_parameters
from ..stages import split_stages
from .distributed import Env, all_reduce_sum, gather_states, gather_to_main, wrap_units
from .loop import Trainer
from .optim import build_optimizer, build_scheduler
from .p2p import Sender, recv_tensors
from .report import EpochProgress
from .stage_timing import unit_seconds
from .state import copy_checkpoint, save_training, set_rng_state

__all__ = ["Layout", "PipelineTrainer"]


@dataclass(frozen=True)
class Layout:
    """Process ``rank`` of ``stages`` x ``replicas``: rank = stage * replicas + replica."""

    stages: int
    replicas: int
    rank: int

    @property
    def stage(self) -> int:
        return self.rank // self.replicas

    @property
    def replica(self) -> int:
        return self.rank % self.replicas

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return stage * self.replicas + (self.replica if replica is None else replica)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1


class PipelineTrainer(Trainer):
    """``Trainer`` for one pipeline stage (of ``recipe.parallel.pipeline``) in this process."""

    def __init__(self, recipe, env: Env, resume=None, log=print, overwrite: bool = False):
        stages = recipe.parallel.pipeline
        if not env.distributed or env.world % stages:
            raise AugLocalError(f"recipe key parallel.pipeline is {stages} but {env.world} process(es) were started; "
                                f"launch a multiple of {stages}: torchrun --nproc_per_node {stages} -m "
                                "auglocal_fx.cli.train ...")
        self.layout = lay = Layout(stages, env.world // stages, env.rank)
        # every rank creates every stage's data-parallel group, in the same order (torch requires it)
        groups = [dist.new_group([lay.rank_of(s, r) for r in range(lay.replicas)]) for s in range(stages)] \
            if lay.replicas > 1 else [None] * stages
        self.group = groups[lay.stage]
        super().__init__(recipe, env, resume, log, overwrite)

    # -- what this process trains ------------------------------------------------------------------
    def _data_env(self) -> Env:
        return Env(self.layout.replica, self.layout.replicas, self.env.device)

    def _make_units(self) -> list:
        lay, net, recipe = self.layout, self.run.net, self.recipe
        units = net.local_units()
        self.needs_image = any(getattr(u.loss, "needs_image", False) for u in units)
        size = net.plan.config.input_size
        image_bytes = 4 * int(torch.tensor(size).prod()) if self.needs_image else 0
        saved = (self._saved or {}).get("train", {}).get("pipeline")
        groups = saved["units"] if saved and (saved["stages"], saved["replicas"]) == (lay.stages, lay.replicas) \
            else None  # resuming: the split the run was trained with
        balance = recipe.parallel.balance
        # measured on rank 0 and shared (each process timing alone would split differently and deadlock)
        costs = self._measure(units) if balance == "time" and groups is None else None
        self.stage_plan = split_stages(net.plan, lay.stages, balance, image_bytes,
                                       where="recipe key parallel.pipeline", costs=costs, groups=groups)
        _check_disjoint(units, self.stage_plan.units)
        self.mine = self.stage_plan.units[lay.stage]
        own = [units[i] for i in self.mine]
        # this stage's optimizer and schedule: the same per-parameter updates as one over the whole net
        self.run.optimizer = build_optimizer(unique_parameters(own), recipe.optimizer)
        self.run.scheduler = build_scheduler(self.run.optimizer, recipe.schedule, recipe.epochs,
                                             len(self.run.train_loader))
        self.sender = Sender(lay.rank_of(lay.stage + 1), self.env.device) if not lay.last else None
        sp = self.stage_plan
        total = sum(sp.costs)
        what = "the measured step time" if costs is not None else "the training FLOPs"
        for s, (us, cost, sent) in enumerate(zip(sp.units, sp.costs, sp.sent)):
            span = f"{us[0]}" if len(us) == 1 else f"{us[0]}-{us[-1]}"
            self.log(f"stage {s}: blocks {span}, {100 * cost / total:.1f}% of {what}"
                     + (f", sends {sent / 1024:,.1f} KiB per sample" if sent else ""))
        return wrap_units(own, self.env, self.group, lay.replicas)

    def _measure(self, units: list) -> list[float]:
        """Seconds per step of every unit, timed once on rank 0 and shared, so every process
        splits the stages alike."""
        net, lay = self.run.net, self.layout
        found = [None]
        if self.env.is_main:
            classes = net.plan.head.out_shape[-1] if net.plan.head.out_shape else 0
            self.log("timing every block for the stage split ...", flush=True)
            found = [unit_seconds(units, net.plan.config.input_size, classes,
                                  self.recipe.batch_size // lay.replicas, self.env.device,
                                  autocast_dtype=self.amp.get("autocast_dtype"))]
        dist.broadcast_object_list(found, src=0)
        return found[0]

    # -- moving batches between stages ----------------------------------------------------------------
    def _receive(self):
        """(boundary input, labels, image) from the stage before."""
        ts = recv_tensors(self.layout.rank_of(self.layout.stage - 1), self.env.device)
        image = ts.pop() if self.needs_image else torch.empty(0, device=self.env.device)
        y = ts.pop()
        return (tuple(ts) if len(ts) > 1 else ts[0]), y, image

    def _send(self, h, y, image) -> None:
        t0 = time.perf_counter()
        self.sender.send([*(h if isinstance(h, tuple) else (h,)), y, *([image] if self.needs_image else [])])
        self._send_s += time.perf_counter() - t0  # blocked only while the next stage is `depth` batches behind

    def _batches(self, loader):
        """This stage's inputs, one per step: loaded on the first stage, received on the others."""
        if self.layout.first:
            for x, y in loader:
                x, y = x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)
                yield x, y, x
        else:
            for _ in range(len(loader)):
                yield self._receive()

    # -- one epoch -----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        r, lay, net = self.run, self.layout, self.run.net
        r.train_loader.sampler.set_epoch(epoch)
        r.train_loader.generator.manual_seed(self.recipe.seed * 7919 + epoch * 104729 + lay.replica)
        net.train()
        m, steps, p = len(net.blocks), len(r.train_loader), lay.stages
        # one all-reduce at the end: per unit loss sums, correct, images, per step (loss sum, images),
        # per stage seconds computing, blocked in sends, in all
        vec = [0.0] * (m + 2 + 2 * steps + 3 * p)
        per_unit = dict(optimizer=r.optimizer) if self.recipe.optimizer.per_unit else {}
        bar = EpochProgress(f"epoch {epoch}/{self.recipe.epochs} (stage {lay.stage})", steps,
                            lay.last and lay.replica == 0)
        busy, images, start = 0.0, 0, time.perf_counter()
        self._send_s = 0.0
        try:
            for step, (h, y, image) in enumerate(self._batches(r.train_loader), 1):
                t0 = time.perf_counter()
                hand_on = None if lay.last else (lambda out, y=y, image=image: self._send(out, y, image))
                out = blockwise_step(self.units, h, y, None, self.amp.get("autocast_dtype"), None,
                                     image=image, hand_on=hand_on, **per_unit)
                losses, n = [*out.local_losses, out.loss], len(y)
                self._check_finite(losses, epoch, step, first=self.mine[0])
                r.optimizer.step()
                r.optimizer.zero_grad(set_to_none=True)
                r.scheduler.step()
                busy += time.perf_counter() - t0
                for i, v in zip(self.mine, losses):
                    vec[i] += v * n
                if lay.last:
                    correct = (out.logits.argmax(1) == y).sum().item()
                    vec[m] += correct
                    vec[m + 1] += n
                    vec[m + 2 * step] += out.loss * n
                    vec[m + 2 * step + 1] += n
                    images += n
                    bar.update(step, vec[m - 1] / vec[m + 1], vec[m] / vec[m + 1], images)
        finally:
            bar.close()
        if self.sender is not None:
            self.sender.flush()
        at = m + 2 + 2 * steps
        vec[at + lay.stage] = busy - self._send_s
        vec[at + p + lay.stage] = self._send_s
        vec[at + 2 * p + lay.stage] = time.perf_counter() - start
        vec = all_reduce_sum(vec, self.env)
        n = vec[m + 1]
        seconds = vec[at + 3 * p - 1] / lay.replicas  # the last stage ends the epoch
        return {"epoch": epoch, "train_loss": vec[m - 1] / n, "train_acc": vec[m] / n,
                "local_losses": [v / n for v in vec[:m - 1]],
                "step_losses": [vec[m + 2 + 2 * k] / vec[m + 3 + 2 * k] for k in range(steps)],
                "lr": r.optimizer.param_groups[0]["lr"], "images_per_s": n / seconds, "epoch_time_s": seconds,
                # per stage, shares of its epoch: computing, and blocked sending (the rest it waited for input)
                "stage_busy": [vec[at + s] / vec[at + 2 * p + s] for s in range(p)],
                "stage_send": [vec[at + p + s] / vec[at + 2 * p + s] for s in range(p)],
                "stage_blocks": self.stage_plan.units}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test accuracy of every head: the test batches stream through the stages as in training."""
        r, lay, net = self.run, self.layout, self.run.net
        net.eval()
        units = [getattr(u, "module", u) for u in self.units]
        amp = torch.autocast(self.env.device.type, torch.bfloat16) if self.recipe.bf16 else nullcontext()
        m = len(net.blocks)
        sums = [0.0] * (m + 2)  # per-head correct, final loss sum, count
        for h, y, image in self._batches(r.eval_loader):
            with amp:
                for i, unit in zip(self.mine, units):
                    h, top = call(unit, h)
                    logits = unit.logits(top)
                    sums[i] += (logits.argmax(1) == y).sum().item()
            if lay.last:
                sums[-2] += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
                sums[-1] += len(y)
            else:
                self._send(h, y, image)
        if self.sender is not None:
            self.sender.flush()
        sums = all_reduce_sum(sums, self.env)
        n = max(sums[-1], 1)
        return {"test_acc": sums[m - 1] / n, "test_loss": sums[-2] / n, "aux_test_acc": [s / n for s in sums[:m - 1]]}

    # -- checkpoints -----------------------------------------------------------------------------------
    def _own_state(self) -> dict:
        """This stage's weights, buffers, optimizer and schedule (what no other stage updates)."""
        net, owned = self.run.net, set()
        for u in self.units:
            u = getattr(u, "module", u)
            owned.update(id(t) for t in [*u.parameters(), *u.buffers()])
        model = {k: v.detach() for k, v in net.model.state_dict(keep_vars=True).items() if id(v) in owned}
        aux = {k: v for k, v in net.aux.state_dict().items() if int(k.split(".", 1)[0]) in self.mine}
        return {"stage": self.layout.stage, "model": model, "aux": aux,
                "optimizer": self.run.optimizer.state_dict(), "scheduler": self.run.scheduler.state_dict()}

    def _save(self, improved: bool) -> None:
        rngs = gather_states(self._rng(), self.env)
        states = gather_to_main(self._own_state() if self.layout.replica == 0 else None, self.env)
        if not self.env.is_main:
            return
        r, stages = self.run, [s for s in states if s is not None]
        for s in stages:  # rank 0 holds every stage's newest weights before it writes the file
            r.net.model.load_state_dict(s["model"], strict=False)
            r.net.aux.load_state_dict(s["aux"], strict=False)
        lay = self.layout
        train = {"epoch": self.epoch, "optimizer": [s["optimizer"] for s in stages],
                 "scheduler": [s["scheduler"] for s in stages], "rng": rngs, "history": self.history,
                 "best_acc": self.best, "recipe": self.recipe.to_dict(),
                 "pipeline": {"stages": lay.stages, "replicas": lay.replicas, "units": self.stage_plan.units}}
        save_training(r.net, self.out / "last.pt", train, r.model_kwargs)
        if improved:
            copy_checkpoint(self.out / "last.pt", self.out / "best.pt")
        self._write_reports()

    def _restore(self, saved: dict) -> None:
        r, t, lay = self.run, saved["train"], self.layout
        p = t.get("pipeline")
        if p is None:
            raise AugLocalError("cannot resume a checkpoint trained without a pipeline with parallel.pipeline="
                                f"{lay.stages}; resume it without parallel.pipeline (or --set parallel.pipeline=1)")
        if (p["stages"], p["replicas"]) != (lay.stages, lay.replicas):
            raise AugLocalError(f"cannot resume: the checkpoint was trained as {p['stages']} stages x {p['replicas']} "
                                f"replicas ({p['stages'] * p['replicas']} processes), this launch is {lay.stages} x "
                                f"{lay.replicas}; launch torchrun --nproc_per_node {p['stages'] * p['replicas']} with "
                                f"--set parallel.pipeline={p['stages']}")
        r.net.model.load_state_dict(saved["model_state"])
        r.net.aux.load_state_dict(saved["aux_state"])
        r.optimizer.load_state_dict(t["optimizer"][lay.stage])
        r.scheduler.load_state_dict(t["scheduler"][lay.stage])
        self.epoch, self.history, self.best = t["epoch"], list(t["history"]), t["best_acc"]
        set_rng_state(t["rng"][self.env.rank])
        self.log(f"resumed from epoch {self.epoch}")


def _check_disjoint(units: list, stages: list[list[int]]) -> None:
    """Each parameter trained by one stage only: a module two stages' blocks both use would be
    updated by each stage on its own copy, and the run would leave the sequential one silently."""
    owner = {}
    for s, us in enumerate(stages):
        for i in us:
            for p in units[i].parameters():
                if owner.setdefault(id(p), (s, i))[0] != s:
                    raise AugLocalError(f"blocks {owner[id(p)][1]} and {i} share a parameter, so they cannot train in "
                                        "different pipeline stages; lower parallel.pipeline or convert with blocks that "
                                        "keep the shared module in one block")
