"""A trained checkpoint on a dataset: the accuracy and loss of its final head and the accuracy of
every aux head (``auglocal-eval``), on its recipe's validation or test split, or on other data
through the recipe's keys (``--set data.dataset=...``)."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..errors import AugLocalError, AugLocalWarning
from ..plan import Plan
from ..runtime.bundles import call
from .build import build_run
from .config import apply_overrides, recipe_from_dict
from .distributed import setup, teardown
from .preflight import in_recipe_words
from .state import read_training

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(path, split: str = "test", overrides: list[str] = (), device: str | None = None) -> dict:
    """``{"acc", "loss", "aux_acc", "images", "split", "epoch", ...}`` of the checkpoint at ``path``
    (written by ``auglocal-train``) on ``split`` ("test" or "val") of its recipe's data, with the
    recipe's keys changed by ``overrides`` (``data.dataset=fashion_mnist``); the weights are the
    ones the file holds (``best.pt`` under ``ema_decay``: the averaged ones)."""
    saved = read_training(path)
    t = saved["train"]
    recipe = recipe_from_dict(apply_overrides(dict(t["recipe"]), list(overrides)))
    env = setup(device or recipe.device)
    try:
        with in_recipe_words(recipe), warnings.catch_warnings():
            warnings.simplefilter("ignore", AugLocalWarning)
            run = build_run(recipe, env, Plan.from_dict(saved["plan"]))
        net = run.net
        try:
            net.model.load_state_dict(saved["model_state"])
            net.aux.load_state_dict(saved["aux_state"])
        except RuntimeError as exc:  # the recipe's changes built another model
            raise AugLocalError(f"{path} does not load into the model the changed recipe builds ({str(exc).splitlines()[0]}); "
                                "change only the data keys (data.dataset, data.root, ...)") from exc
        loader = run.val_loader if split == "val" else run.test_loader
        if loader is None:
            raise AugLocalError(f"the run of {path} has no validation split (data.val_split is 0); use --split test")
        amp = torch.autocast(env.device.type, torch.bfloat16) if recipe.bf16 else nullcontext()
        with amp:  # as the trainer evaluated it
            found = _evaluate(net.to(env.device).eval(), loader, env.device)
    finally:
        teardown(env)
    return {"checkpoint": str(path), "epoch": t["epoch"], "weights": saved.get("weights", "model"),
            "dataset": recipe.data.dataset, "split": split, **found}


@torch.no_grad()
def _evaluate(net, loader, device) -> dict:
    """One pass over ``loader`` through every unit: each head's correct count, the final loss."""
    units = net.local_units()
    correct = torch.zeros(len(units), dtype=torch.float64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    images = 0
    for x, y in loader:
        h, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for i, unit in enumerate(units):
            h, top = call(unit, h)
            logits = unit.logits(top)
            correct[i] += (logits.argmax(1) == y).sum()
        loss += F.cross_entropy(logits.float(), y, reduction="sum")
        images += len(y)
    n = max(images, 1)
    acc = (correct / n).tolist()
    return {"images": images, "acc": acc[-1], "loss": float(loss) / n, "aux_acc": acc[:-1]}
