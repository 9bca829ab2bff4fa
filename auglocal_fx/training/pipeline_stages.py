"""``PipelineStages``: one stage of the units in this process (``parallel.pipeline: P``), the other
strategy a ``Trainer`` is composed with (``strategies.py``).

Why pipeline stages are exact: sequential training runs unit k on batch n with unit k's parameters
after its step n-1 update, and hands unit k+1 the output computed before unit k's step n update. A
stage does the same: it computes batch n's output with its parameters before their step n update,
sends it, then updates. So stage k+1 receives exactly the tensor the sequential loop would have
given it, and the run computes the same updates (up to floating-point order); batch-norm statistics
too, since every stage sees whole batches. Only random draws inside the model (dropout, drop-path)
differ: each process has its own generator. Nothing flows backward and no stage waits for a later
one (three stages on batches 1, 2, 3 ...)::

    stage 0 | F1 B1 | F2 B2 | F3 B3 | F4 B4 | ...
    stage 1 |     F1 B1 | F2 B2 | F3 B3 | ...        F: forward (sends on at its end)
    stage 2 |         F1 B1 | F2 B2 | ...            B: local backward(s) + optimizer step

Transfers are ``torch.distributed`` ``isend``/``irecv`` (``p2p.py``). ``torch.distributed.pipelining``
(``PipelineStage`` + a schedule) is built for pipelined *backprop*: its schedules send gradients to
the previous stage and have one loss at the last stage; here every stage has its own losses and
optimizer and nothing goes backward, which its schedules do not express.

What a process holds: the net is converted with every aux net on the meta device (each built only to
be measured, one at a time); the stage then builds its own aux nets, which start exactly as in the
one-process run (each aux net's init is seeded from the run seed and its index, ``AuxFactory``),
moves the other stages' blocks to the meta device, and only then goes to the device and gets an
optimizer. The backbone itself is still created whole once (timm initialises in its constructors,
in one random stream), a small share of an AugLocal net (resnet50 K=16: 98 of 691 MiB of weights).
Each process writes its own stage into a sharded checkpoint (``torch.distributed.checkpoint``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh

from ..errors import AugLocalError
from ..runtime.checkpoint import read_checkpoint, shard_folder
from ..runtime.net import unique_parameters
from ..stages import assign_stages, stage_memory
from .distributed import Env, barrier, from_bytes, to_bytes, wrap_units
from .p2p import Sender, recv_tensors
from .stage_timing import unit_seconds

__all__ = ["PipelineStages", "check_disjoint"]


class PipelineStages:
    """One stage of ``stages`` in this process; ``env.world / stages`` replicas of every stage."""

    def __init__(self, stages: int, env: Env):
        if not env.distributed or env.world % stages:
            raise AugLocalError(f"recipe key parallel.pipeline is {stages} but {env.world} process(es) were started; "
                                f"launch a multiple of {stages}: auglocal-train --nproc {stages} ... (or torchrun "
                                f"--nproc_per_node {stages} -m auglocal_fx.cli.train ...)")
        self.env, self.stages, self.replicas = env, stages, env.world // stages
        # rank = stage * replicas + replica; every rank creates every group of both dimensions
        self.mesh = init_device_mesh(env.device.type, (stages, self.replicas), mesh_dim_names=("pp", "dp"))
        self.stage, self.replica = self.mesh.get_local_rank("pp"), self.mesh.get_local_rank("dp")
        self.dp_group = self.mesh.get_group("dp")
        self.first, self.last = self.stage == 0, self.stage == stages - 1
        self.has_head = self.last
        self.lazy_aux = True  # the net is converted with its aux nets on the meta device: this stage builds its own
        self.shows_progress = self.last and self.replica == 0
        self.title = f" (stage {self.stage})"
        self.data_env = Env(self.replica, self.replicas, env.device)  # sharded over a stage's replicas
        self._send_s = 0.0

    def _rank(self, stage: int) -> int:
        """The global rank of ``stage``'s process at this process's replica."""
        return int(self.mesh.mesh[stage, self.replica])

    # -- what this process trains ---------------------------------------------------------------------
    def attach(self, units: list, net, recipe, saved: dict | None, autocast_dtype, log, place) -> list:
        """Split the units into stages (as the checkpoint did when resuming), log the split, build
        this stage's aux nets (the conversion left them all on the meta device), free the other
        stages' blocks, ``place(net)`` on the run's device and return this stage's units (in DDP over
        the stage's replicas when there are several)."""
        self.needs_image = any(getattr(u.loss, "needs_image", False) for u in units)
        size = net.plan.config.input_size
        image_bytes = 4 * int(torch.tensor(size).prod()) if self.needs_image else 0
        before = (saved or {}).get("train", {}).get("pipeline")
        groups = before["units"] if before and (before["stages"], before["replicas"]) == (self.stages, self.replicas) \
            else None  # resuming: the split the run was trained with
        balance = recipe.parallel.balance
        costs = self._measure(units, net, recipe, autocast_dtype, log, place) \
            if balance == "time" and groups is None else None
        self.split = assign_stages(net.plan, self.stages, balance, image_bytes,
                                  where="recipe key parallel.pipeline", costs=costs, groups=groups)
        check_disjoint(units, self.split.units)
        self.mine = self.split.units[self.stage]
        self.sender = Sender(self._rank(self.stage + 1), self.env.device) if not self.last else None
        total, sp = sum(self.split.costs), self.split
        what = "the measured step time" if costs is not None else "the training FLOPs"
        # the plan's estimate of each process's peak, the runtime (torch itself) not counted
        self.estimate = [m["peak_bytes"] for m in stage_memory(net.plan, sp)]
        for s, (us, cost, sent, peak) in enumerate(zip(sp.units, sp.costs, sp.sent, self.estimate)):
            span = f"{us[0]}" if len(us) == 1 else f"{us[0]}-{us[-1]}"
            log(f"stage {s}: blocks {span}, {100 * cost / total:.1f}% of {what}"
                + (f", sends {sent / 1024:,.1f} KiB per sample" if sent else "")
                + f", estimated peak {peak / 2**20:,.0f} MiB + the runtime")
        net.materialize_aux([i for i in self.mine if i < len(net.aux)])
        net.drop_aux_factory()  # the fresh model aux_init="model" copies from, the graph pieces
        units = net.local_units()  # with this stage's aux nets built
        own = [units[i] for i in self.mine]
        self._keys = _net_keys(net, own)
        _release([u for i, u in enumerate(units) if i not in self.mine], own)
        place(net)  # only this stage's tensors reach the device
        return wrap_units(own, self.env, self.dp_group, self.replicas)

    def _measure(self, units, net, recipe, autocast_dtype, log, place) -> list[float]:
        """Seconds per step of every unit, timed once on rank 0 and shared, so every process
        splits the stages alike (each timing alone would split differently and deadlock). Each unit
        is timed on a copy placed as training places the net (device, channels_last)."""
        def copy_unit(i: int):
            unit = net.unit_copy(i)
            place(unit)
            return unit

        found = [None]
        if self.env.is_main:
            classes = net.plan.head.out_shape[-1] if net.plan.head.out_shape else 0
            log("timing every block for the stage split ...", flush=True)
            found = [unit_seconds(units, net.plan.config.input_size, classes, recipe.batch_size // self.replicas,
                                  self.env.device, autocast_dtype=autocast_dtype,
                                  input_dtype=getattr(torch, net.plan.config.input_dtype), copy_unit=copy_unit)]
        dist.broadcast_object_list(found, src=0)
        return found[0]

    # -- moving batches between stages ----------------------------------------------------------------
    def batches(self, loader, prepare):
        """This stage's inputs, one per step: loaded (and ``prepare``d) on the first stage, received
        on the others."""
        if self.first:
            for x, y in loader:
                x, y = prepare(x, y)
                yield x, y, x
            return
        for _ in range(len(loader)):
            ts = recv_tensors(self._rank(self.stage - 1), self.env.device)
            image = ts.pop() if self.needs_image else torch.empty(0, device=self.env.device)
            y = ts.pop()
            yield (tuple(ts) if len(ts) > 1 else ts[0]), y, image

    def hand_on(self, y, image):
        """What receives the last unit's detached output: a send to the next stage (none on the last)."""
        if self.last:
            return None

        def send(h):
            t0 = time.perf_counter()
            self.sender.send([*(h if isinstance(h, tuple) else (h,)), y, *([image] if self.needs_image else [])])
            self._send_s += time.perf_counter() - t0  # blocked only while the next stage is `depth` batches behind
        return send

    def flush(self) -> None:
        if self.sender is not None:
            self.sender.flush()

    # -- what an epoch adds to the metrics ------------------------------------------------------------
    def start_epoch(self) -> None:
        self._send_s = 0.0

    def metric_sizes(self) -> dict[str, int]:
        # per stage: seconds computing (sends excluded), blocked in sends, the whole epoch
        return {"stage_busy": self.stages, "stage_send": self.stages, "stage_wall": self.stages}

    def end_epoch(self, sums, busy: float, wall: float) -> None:
        self.flush()
        if self.replica == 0:
            sums.add("stage_busy", busy - self._send_s, self.stage)
            sums.add("stage_send", self._send_s, self.stage)
            sums.add("stage_wall", wall, self.stage)

    def record(self, reduced: dict) -> dict:
        """Per stage, shares of its epoch: computing, and blocked sending (the rest it waited for input)."""
        wall = reduced["stage_wall"]
        return {"stage_busy": [b / w for b, w in zip(reduced["stage_busy"], wall)],
                "stage_send": [s / w for s, w in zip(reduced["stage_send"], wall)],
                "stage_blocks": self.split.units, "stage_estimate_gib": [b / 2**30 for b in self.estimate]}

    def parameters(self, net, units: list) -> list:
        """What this stage's optimizer steps: its units' parameters, each once. Per-parameter optimizers
        make the same updates as one over the whole net."""
        return unique_parameters([getattr(u, "module", u) for u in units])

    # -- checkpoints -----------------------------------------------------------------------------------
    def _keyed(self, units: list, lead: str = "") -> dict:
        """The tensors of ``units`` (this stage's, or copies of them) keyed as in the net, after
        ``lead`` ("model.<key>", "aux.<key>"; "ema.model.<key>" ...): what the shard folder holds."""
        return {lead + keys[k]: v.detach() for keys, u in zip(self._keys, units)
                for k, v in getattr(u, "module", u).state_dict(keep_vars=True).items() if k in keys}

    def _state(self, units: list, ema) -> dict:
        """This stage's weights, and its averages under ema_decay: what goes into, or is read from,
        the shard folder."""
        return {**self._keyed(units), **(self._keyed(ema.units, "ema.") if ema is not None else {})}

    def checkpoint(self, net, units: list, optimizer, scheduler, ema, out: Path, name: str) -> dict | None:
        """Every process writes its own stage into the shard folder ``out/shards/<name>``
        (``torch.distributed.checkpoint``: replicas of a stage write once); the folder appears under
        its name only when every shard is written. Rank 0 gets what the checkpoint file says."""
        folder = out / "shards" / name
        tmp = folder.with_name(name + ".tmp")
        if self.env.is_main and tmp.exists():  # a save a crash cut short
            shutil.rmtree(tmp)
        barrier(self.env)
        state = self._state(units, ema)
        lead = f"stage{self.stage}"
        tensors, rest = _split_optimizer(optimizer.state_dict(), f"{lead}.optim")
        state.update(tensors)  # as tensors: DCP writes a large pickled blob through several copies
        state[f"{lead}.state"] = to_bytes({"optimizer": rest, "scheduler": scheduler.state_dict()})
        dcp.save(state, checkpoint_id=str(tmp))
        barrier(self.env)
        if not self.env.is_main:
            return None
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return {"shards": f"shards/{name}",
                "pipeline": {"stages": self.stages, "replicas": self.replicas, "units": self.split.units}}

    def restore(self, net, units: list, optimizer, scheduler, ema, payload: dict, path) -> None:
        """This stage's weights, averages, optimizer and schedule, read from the shard folder."""
        p = payload["train"].get("pipeline")
        if p is None:
            raise AugLocalError("cannot resume a checkpoint trained without a pipeline with parallel.pipeline="
                                f"{self.stages}; resume it without parallel.pipeline (or --set parallel.pipeline=1)")
        if (p["stages"], p["replicas"]) != (self.stages, self.replicas):
            raise AugLocalError(f"cannot resume: the checkpoint was trained as {p['stages']} stages x {p['replicas']} "
                                f"replicas ({p['stages'] * p['replicas']} processes), this launch is {self.stages} x "
                                f"{self.replicas}; launch {p['stages'] * p['replicas']} processes (auglocal-train --nproc "
                                f"{p['stages'] * p['replicas']}) with --set parallel.pipeline={p['stages']}")
        if not payload.get("shards"):
            raise AugLocalError(f"cannot resume from {path}: it was written before pipeline checkpoints were sharded; "
                                f"start a new run from its weights: --set model.checkpoint={path} --set output=<a new "
                                "folder>")
        folder = shard_folder(path, payload)
        state = self._state(units, ema)
        lead = f"stage{self.stage}"
        stored = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        optim = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in stored.items()
                 if k.startswith(f"{lead}.optim.")}  # the optimizer's tensors, allocated as saved
        state.update(optim)
        state[f"{lead}.state"] = b""
        dcp.load(state, checkpoint_id=str(folder))  # the weights in place
        own = from_bytes(state[f"{lead}.state"])
        optimizer.load_state_dict(_join_optimizer(own["optimizer"], optim, f"{lead}.optim"))
        scheduler.load_state_dict(own["scheduler"])

    def load_weights(self, net, units: list, path) -> None:
        """This stage's weights from checkpoint ``path``'s shards (the averages where the file says so)."""
        payload = read_checkpoint(path, weights=False)
        lead = "ema." if payload.get("weights") == "ema" else ""
        dcp.load(self._keyed(units, lead), checkpoint_id=str(shard_folder(path, payload)))


def _release(others: list, own: list) -> None:
    """The other stages' weights and buffers leave this process (to the meta device): it never runs
    those units, and checkpoints are sharded. A tensor this stage's units also hold (a buffer-only
    module two stages share, a rotary cache) stays."""
    kept = {id(t) for u in own for t in [*u.parameters(), *u.buffers()]}
    for unit in others:
        for module in unit.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) not in kept and p.device.type != "meta":
                    module._parameters[name] = torch.nn.Parameter(p.detach().to("meta"), p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None and id(b) not in kept and b.device.type != "meta":
                    module._buffers[name] = b.to("meta")
    # hand the pages back: glibc keeps freed heap memory for reuse (the resident size would not
    # show the saving), and CUDA's caching allocator keeps freed blocks reserved
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the memory is reused, only not returned
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _split_optimizer(state: dict, lead: str) -> tuple[dict, dict]:
    """An optimizer's state dict as its tensors ("<lead>.<param index>.<name>") and the rest."""
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        rest["state"][idx] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{lead}.{idx}.{name}"] = value
            else:
                rest["state"][idx][name] = value
    return tensors, rest


def _join_optimizer(rest: dict, tensors: dict, lead: str) -> dict:
    """``_split_optimizer``'s inverse."""
    state = {idx: dict(entry) for idx, entry in rest["state"].items()}
    for key, value in tensors.items():
        idx, name = key[len(lead) + 1:].split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _net_keys(net, units: list) -> list[dict]:
    """Per unit, its state-dict keys mapped to the net's ("model.<key>" / "aux.<key>"), found by
    tensor identity: a unit's block and aux net are the net's own modules."""
    ids = {id(v): "model." + k for k, v in net.model.state_dict(keep_vars=True).items()}
    ids.update({id(v): "aux." + k for k, v in net.aux.state_dict(keep_vars=True).items()})
    return [{k: ids[id(v)] for k, v in getattr(u, "module", u).state_dict(keep_vars=True).items() if id(v) in ids}
            for u in units]


def check_disjoint(units: list, stages: list[list[int]]) -> None:
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

