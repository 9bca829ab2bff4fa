"""How a run's units are laid out over the processes: the strategy a ``Trainer`` is composed with.

- ``DataParallel``: every unit in this process; under ``torchrun`` each unit in its own DDP over all
  processes (``distributed.wrap_units`` says why one per unit).
- ``PipelineStages`` (``parallel.pipeline: P``): P stages x R data-parallel replicas, laid out as a
  ``DeviceMesh`` of shape (P, R) named ("pp", "dp"); this process trains one stage's units on the
  batches the stage before it sends.

A strategy answers only what differs between the two: which units this process trains (``mine``),
where its batches come from and where its outputs go (``batches``, ``hand_on``), which data shard
it loads, what its epoch adds to the metrics, and its part of a checkpoint. The ``Trainer`` runs the
epochs, evaluation, checkpoints and reports once for both.

The pipeline strategy, and why it is the sequential run, is in ``pipeline_stages.py``.
"""

from __future__ import annotations

from pathlib import Path

from torch.distributed.device_mesh import init_device_mesh

from ..errors import AugLocalError
from ..runtime.checkpoint import read_checkpoint
from .distributed import Env, wrap_units
from .pipeline_stages import PipelineStages, check_disjoint  # noqa: F401  check_disjoint: with the strategies

__all__ = ["DataParallel", "PipelineStages", "make_strategy"]


def make_strategy(recipe, env: Env):
    """``PipelineStages`` when the recipe asks for stages, else ``DataParallel``."""
    return PipelineStages(recipe.parallel.pipeline, env) if recipe.parallel.pipeline > 1 else DataParallel(env)


class DataParallel:
    """Every unit in this process, data-parallel over all processes under torchrun."""

    has_head = True  # this process computes the final logits (accuracy, final loss)
    title = ""
    lazy_aux = False  # every aux net is trained here: built at conversion

    def __init__(self, env: Env):
        self.env = env
        self.mesh = init_device_mesh(env.device.type, (env.world,), mesh_dim_names=("dp",)) \
            if env.distributed else None
        self.dp_group = self.mesh.get_group("dp") if self.mesh is not None else None
        self.data_env = env  # the data is sharded over every process
        self.shows_progress = env.is_main

    def attach(self, units: list, net, recipe, saved: dict | None, autocast_dtype, log, place) -> list:
        """The units this process trains (each in its own DDP under torchrun), after ``place(net)``
        put the net on the run's device."""
        self.mine = list(range(len(units)))
        place(net)
        return wrap_units(units, self.env, self.dp_group)

    def batches(self, loader, prepare):
        """``(input, targets, image)`` per step; ``prepare(x, y)`` moves a loaded batch to the device
        (and mixes it, in training)."""
        for x, y in loader:
            x, y = prepare(x, y)
            yield x, y, x

    def hand_on(self, y, image):
        return None

    def flush(self) -> None:
        pass

    def start_epoch(self) -> None:
        pass

    def metric_sizes(self) -> dict[str, int]:
        return {}

    def end_epoch(self, sums, busy: float, wall: float) -> None:
        pass

    def record(self, reduced: dict) -> dict:
        return {}

    def parameters(self, net, units: list) -> list:
        """What the optimizer steps: every parameter of the net, in its order (checkpoints index it so)."""
        return list(net.parameters())

    def checkpoint(self, net, units: list, optimizer, scheduler, ema, out: Path, name: str) -> dict | None:
        """This run's part of ``last.pt``'s training state (rank 0; None elsewhere); ``ema``: the
        averages of the units. The weights go into the file itself (``shards`` None)."""
        if not self.env.is_main:
            return None
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ema": ema.state_dicts() if ema is not None else None, "shards": None}

    def restore(self, net, units: list, optimizer, scheduler, ema, payload: dict, path) -> None:
        """Weights, optimizer, schedule and averages from ``payload`` (read from ``path``)."""
        train = payload["train"]
        if "pipeline" in train:
            p = train["pipeline"]
            raise AugLocalError(f"cannot resume from a {p['stages']}-stage pipeline checkpoint in one pipeline stage; "
                                f"launch {p['stages'] * p['replicas']} processes with --set "
                                f"parallel.pipeline={p['stages']}")
        net.model.load_state_dict(payload["model_state"])
        net.aux.load_state_dict(payload["aux_state"])
        optimizer.load_state_dict(train["optimizer"])
        scheduler.load_state_dict(train["scheduler"])
        if ema is not None:
            ema.load([train["ema"][i] for i in self.mine])

    def load_weights(self, net, units: list, path) -> None:
        """The net's weights from checkpoint ``path`` (every process reads the file)."""
        payload = read_checkpoint(path)
        net.model.load_state_dict(payload["model_state"])
        net.aux.load_state_dict(payload["aux_state"])
