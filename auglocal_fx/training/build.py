"""Everything a run needs before its first step: data, model, converted net, optimizer, schedule.

Built the same way for a new run and a resumed one; a resumed run then loads the saved state
(the saved plan rebuilds the exact same blocks and aux nets, no re-profiling).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import timm
import torch

from ..compiler import to_auglocal
from ..errors import AugLocalError, first_line
from ..fingerprint import check_fingerprint
from ..models import create_model
from ..plan import Plan
from ..runtime.checkpoint import read_checkpoint
from ..runtime.net import AugLocalNet
from .config import TrainRecipe, conversion_options
from .data import DATASETS, DataBundle, build_data, eval_loader, train_loader
from .distributed import Env
from .optim import build_optimizer, build_scheduler

__all__ = ["Run", "build_run", "model_kwargs", "load_weights"]


@dataclass
class Run:
    net: AugLocalNet
    data: DataBundle
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    model_kwargs: dict


def model_kwargs(recipe: TrainRecipe, data: DataBundle) -> dict:
    """``timm.create_model`` keywords: classes and channels default to the dataset's."""
    m = recipe.model
    kwargs = {"num_classes": m.num_classes or data.classes, "in_chans": m.in_chans or data.channels, **m.kwargs}
    if m.img_size is not None:
        kwargs["img_size"] = m.img_size
    return kwargs


def load_weights(model: torch.nn.Module, path: str) -> None:
    """``model``'s weights from ``path``: an auglocal-fx checkpoint's backbone, or a timm / torch
    weights file (``timm.models.load_checkpoint``); one-line errors for a missing or foreign file."""
    if not os.path.isfile(path):
        raise AugLocalError(f"recipe key model.checkpoint {path} is not a file; give a run's best.pt / last.pt "
                            "or a weights file")
    try:
        payload = read_checkpoint(path)
    except AugLocalError:  # not ours: a timm / torch weights file
        payload = None
    try:
        if payload is not None:
            model.load_state_dict(payload["model_state"])
        else:
            timm.models.load_checkpoint(model, path, strict=True)
    except (RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        raise AugLocalError(f"recipe key model.checkpoint {path} holds weights of another model than "
                            f"{type(model).__name__} ({first_line(exc, 160, with_type=False)}); give weights of this "
                            "architecture") from exc


def _per_rank(total: int, env: Env, key: str) -> int:
    if total % env.world:
        raise AugLocalError(f"recipe key {key} ({total}) must divide evenly across the {env.world} data-parallel "
                            "processes (a pipeline's: replicas per stage)")
    return total // env.world


def build_run(recipe: TrainRecipe, env: Env, plan: Plan | None = None) -> Run:
    """Build the run on ``env.device``; with ``plan`` (resuming) the net follows that plan."""
    data = build_data(recipe.data, channels=recipe.model.in_chans, classes=recipe.model.num_classes)
    kwargs = model_kwargs(recipe, data)
    if kwargs["in_chans"] != data.channels and not DATASETS[recipe.data.dataset].generated:
        raise AugLocalError(f"recipe key model.in_chans is {kwargs['in_chans']} but {recipe.data.dataset} "
                            f"images have {data.channels} channel(s); remove it or set it to {data.channels}")
    classes = recipe.model.num_classes
    if classes is not None and classes < data.classes:  # a label past the last logit fails mid-epoch
        raise AugLocalError(f"recipe key model.num_classes is {classes} but {recipe.data.dataset} has "
                            f"{data.classes} classes; remove it or set it to at least {data.classes}")
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank (DDP also broadcasts)
    model = create_model(recipe.model.name, pretrained=recipe.model.pretrained, **kwargs)
    if recipe.model.checkpoint is not None and plan is None:  # resuming loads the run's own weights instead
        load_weights(model, recipe.model.checkpoint)
    size = [kwargs["in_chans"], data.size, data.size]
    batch = _per_rank(recipe.batch_size, env, "batch_size")
    if plan is None:  # the memory estimate and balance=memory at the batch each process trains on
        options = conversion_options(recipe, input_size=size, model=recipe.model.name, batch=batch)
        net = to_auglocal(model, options, model_kwargs=kwargs)
    else:  # resuming: the saved plan rebuilds the same blocks and aux nets (no profiling), whose
        # weights the checkpoint then replaces: nothing to initialise
        check_fingerprint(model, plan, lead="the checkpoint's plan was made for another model",
                          fix="resume it with the model it was trained with, or start a new run")
        net = to_auglocal(model, plan=plan, aux_init="copy")
    mean, std = DATASETS[recipe.data.dataset].stats
    if len(mean) == kwargs["in_chans"]:  # what the loader normalises with: infopro restores the images with it
        net.image_stats = (mean, std)
    net.to(env.device)
    eval_batch = _per_rank(recipe.eval_batch_size or recipe.batch_size, env, "eval_batch_size")
    pin = env.device.type == "cuda"
    workers = recipe.data.num_workers
    train = train_loader(data.train, batch, workers, recipe.seed, env.rank, env.world, pin)
    if len(train) == 0:
        raise AugLocalError(f"recipe key batch_size ({recipe.batch_size}) exceeds the {len(data.train)} "
                            "training images; lower it")
    evals = eval_loader(data.test, eval_batch, workers, env.rank, env.world, pin)
    opt = build_optimizer(net.parameters(), recipe.optimizer)
    sched = build_scheduler(opt, recipe.schedule, recipe.epochs, len(train))
    return Run(net, data, train, evals, opt, sched, kwargs)
