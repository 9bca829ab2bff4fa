"""Everything a run needs before its first step: data, model, converted net, loaders (the Trainer
adds the optimizer and schedule over what its strategy trains).

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
from ..models import create_from_factory, create_model, import_object, takes
from ..plan import Plan
from ..runtime.checkpoint import read_checkpoint
from ..runtime.net import AugLocalNet
from .config import TrainRecipe, conversion_options
from .data import DATASETS, DataBundle, build_data, eval_loader, train_loader
from .distributed import Env

__all__ = ["Run", "build_run", "model_kwargs", "load_weights"]


@dataclass
class Run:
    net: AugLocalNet
    data: DataBundle
    train_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    model_kwargs: dict  # what the model was made with (the checkpoint keeps them: load_auglocal re-makes it)
    # the validation images (data.val_split or the dataset's own), sharded like test_loader; None: none
    val_loader: torch.utils.data.DataLoader | None = None
    # over the parameters this process trains (which the strategy says): set by the Trainer
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None


# the keywords timm's models take that a recipe sets outside model.kwargs
_SHAPING = ("num_classes", "in_chans", "img_size")


def model_kwargs(recipe: TrainRecipe, data: DataBundle) -> dict:
    """The keywords the model is made with. A timm name: ``timm.create_model``'s, classes and
    channels defaulting to the dataset's. A factory: ``model.kwargs``, plus ``num_classes`` /
    ``in_chans`` / ``img_size`` when the recipe sets them (model.num_classes, ...), and the dataset's
    classes / channels when the factory's signature names ``num_classes`` / ``in_chans``."""
    m = recipe.model
    if m.factory is not None:
        fn = import_object(m.factory, "recipe key model.factory")
        kwargs = dict(m.kwargs)
        for key, value, default in zip(_SHAPING, (m.num_classes, m.in_chans, m.img_size),
                                       (data.classes, data.channels, None)):
            if key in kwargs:
                continue
            if value is not None:  # set in the recipe: the factory must take it
                if not takes(fn, key):
                    raise AugLocalError(f"recipe key model.{key} is {value} but model.factory {m.factory!r} takes no "
                                        f"{key} argument; remove it, or give the factory a {key} parameter")
                kwargs[key] = value
            elif default is not None and takes(fn, key):
                kwargs[key] = default
        return kwargs
    kwargs = {"num_classes": m.num_classes or data.classes}
    if (m.in_chans or data.channels) is not None:  # your own data that is not images: no in_chans
        kwargs["in_chans"] = m.in_chans or data.channels
    kwargs.update(m.kwargs)
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
    state = None
    try:
        # timm's reader unwraps "state_dict" / "model" entries and DataParallel's "module." prefixes
        if payload is None and path.endswith((".npz", ".npy")):  # big_vision weights: the model's own loader
            timm.models.load_checkpoint(model, path, strict=True)
            return
        state = payload["model_state"] if payload is not None else timm.models.load_state_dict(path)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        why = state_mismatch(model, state) if state is not None else first_line(exc, 160, with_type=False)
        raise AugLocalError(f"recipe key model.checkpoint {path} holds weights of another model than "
                            f"{type(model).__name__} ({why}); give weights of this architecture") from exc


def state_mismatch(model: torch.nn.Module, state: dict) -> str:
    """What differs between ``model``'s parameters and buffers and the weights ``state``: counts and the
    first of each kind (torch's own message starts with a line that names none of them)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if shaped:
        k = shaped[0]
        parts.append(f"{len(shaped)} of another shape, e.g. {k} {list(state[k].shape)} where this model has "
                     f"{list(own[k].shape)}")
    if missing:
        parts.append(f"{len(missing)} of this model's missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} it does not have, e.g. {unexpected[0]}")
    return "; ".join(parts) or "the weights do not load"


def _check_outputs(net: AugLocalNet, data: DataBundle, recipe: TrainRecipe) -> None:
    """A model with fewer class scores than the data has classes fails at its first step on a label
    past the last score (an IndexError on the CPU, a device assert on a GPU): refused before the run
    writes anything."""
    shape = net.plan.head.out_shape
    if shape and data.classes and shape[-1] < data.classes:
        raise AugLocalError(f"the model gives {shape[-1]} class scores but {recipe.data.dataset} has {data.classes} "
                            f"classes (labels up to {data.classes - 1}); give it at least {data.classes} outputs "
                            "(model.num_classes, model.kwargs.num_classes or your factory's)")


def _per_rank(total: int, env: Env, key: str) -> int:
    if total % env.world:
        raise AugLocalError(f"recipe key {key} ({total}) must divide evenly across the {env.world} data-parallel "
                            "processes (a pipeline's: replicas per stage)")
    return total // env.world


def _make_model(recipe: TrainRecipe, kwargs: dict) -> torch.nn.Module:
    m = recipe.model
    if m.factory is not None:
        return create_from_factory(m.factory, kwargs)
    return create_model(m.name, pretrained=m.pretrained, **kwargs)


def build_run(recipe: TrainRecipe, env: Env, plan: Plan | None = None, lazy_aux: bool = False) -> Run:
    """Build the run for ``env`` (the net on the CPU: the Trainer places it once its strategy has
    chosen what this process trains); with ``plan`` (resuming) the net follows that plan. ``lazy_aux``:
    the aux nets are left on the meta device (``to_auglocal``), for the strategy to build its own."""
    m = recipe.model
    classes = m.num_classes or m.kwargs.get("num_classes")
    data = build_data(recipe.data, channels=m.in_chans, classes=classes if isinstance(classes, int) else None)
    builtin = recipe.data.dataset in DATASETS
    kwargs = model_kwargs(recipe, data)
    in_chans = kwargs.get("in_chans")
    if in_chans is not None and data.channels is not None and in_chans != data.channels and not (
            builtin and DATASETS[recipe.data.dataset].generated):
        raise AugLocalError(f"recipe key model.in_chans is {in_chans} but {recipe.data.dataset} "
                            f"images have {data.channels} channel(s); remove it or set it to {data.channels}")
    if m.num_classes is not None and m.num_classes < data.classes:  # a label past the last logit fails mid-epoch
        raise AugLocalError(f"recipe key model.num_classes is {m.num_classes} but {recipe.data.dataset} has "
                            f"{data.classes} classes; remove it or set it to at least {data.classes}")
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank (DDP also broadcasts)
    model = _make_model(recipe, kwargs)
    if m.checkpoint is not None and plan is None:  # resuming loads the run's own weights instead
        load_weights(model, m.checkpoint)
    batch = _per_rank(recipe.batch_size, env, "batch_size")
    if plan is None:  # the memory estimate and balance=memory at the batch each process trains on
        if data.example is not None:  # your own data: planned on its first input (its shape and dtype)
            size, example = None, data.example
        else:
            size, example = [in_chans or data.channels, data.size, data.size], None
        options = conversion_options(recipe, input_size=size, model=m.name, batch=batch)
        # aux_init=model re-makes a timm model with these keywords; a factory's model is not re-made
        net = to_auglocal(model, options, model_kwargs=kwargs if m.factory is None else None,
                          example_inputs=example, lazy_aux=lazy_aux)
    else:  # resuming: the saved plan rebuilds the same blocks and aux nets (no profiling), whose
        # weights the checkpoint then replaces: nothing to initialise
        check_fingerprint(model, plan, lead="the checkpoint's plan was made for another model",
                          fix="resume it with the model it was trained with, or start a new run")
        net = to_auglocal(model, plan=plan, aux_init="copy", lazy_aux=lazy_aux)
    _check_outputs(net, data, recipe)
    if m.factory is not None:  # how load_auglocal / auglocal-export re-make the model: import and call it
        net.options["model_factory"] = m.factory
    if data.stats is not None and len(data.stats[0]) == (in_chans or data.channels):
        net.image_stats = data.stats  # what the loader normalises with: infopro restores the images with it
    eval_batch = _per_rank(recipe.eval_batch_size or recipe.batch_size, env, "eval_batch_size")
    pin = env.device.type == "cuda"
    workers = recipe.data.num_workers
    train = train_loader(data.train, batch, workers, recipe.seed, env.rank, env.world, pin)
    if len(train) == 0:
        raise AugLocalError(f"recipe key batch_size ({recipe.batch_size}) exceeds the {len(data.train)} "
                            "training images; lower it")
    evals = eval_loader(data.test, eval_batch, workers, env.rank, env.world, pin)
    vals = eval_loader(data.val, eval_batch, workers, env.rank, env.world, pin) if data.val is not None else None
    return Run(net, data, train, evals, kwargs, vals)
