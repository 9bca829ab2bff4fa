"""What a run checks before it starts, and how the library's errors about its parameters read to a
recipe user: ``preflight`` builds everything ``train`` builds before its first step (the recipe's
model converted, its data, the techniques it asks for), writing nothing (``auglocal-train --check``)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from ..errors import AugLocalError, AugLocalWarning
from ..plan import Plan
from .build import Run, build_run
from .config import RECIPE_KEYS, TrainRecipe
from .data import DATASETS
from .distributed import setup, teardown
from .resume_checks import check_resume
from .run_folder import check_run_folder
from .state import read_training
from .techniques import check_techniques

__all__ = ["preflight", "in_recipe_words"]

# the library's parameters as a recipe sets them: planning options are conversion keys; the input
# size comes from the data and model sections
_WORDS = {**RECIPE_KEYS, "input_size": "the input size that recipe keys model.in_chans and data.image_size give,"}
_HINTS = {"input_size": " (a ViT made for another size: set model.img_size to data.image_size)"}
# your own data (data.dataset: module:function) sets the size by its samples; data.image_size is not taken
_OWN_DATA_WORDS = {**_WORDS, "input_size": "the input size of recipe key data.dataset's samples,"}
_OWN_DATA_HINTS = {"input_size": " (a ViT made for another size: set model.img_size, or the keyword your factory "
                                 "takes, to your samples' size)"}


@contextmanager
def in_recipe_words(recipe: TrainRecipe):
    """An ``AugLocalError`` about a library parameter (``blocks=``, ``input_size=``) raised inside
    is raised again naming the recipe key that sets it."""
    try:
        yield
    except AugLocalError as exc:
        if exc.param not in _WORDS:
            raise
        own = recipe.data.dataset not in DATASETS
        words, hints = (_OWN_DATA_WORDS, _OWN_DATA_HINTS) if own else (_WORDS, _HINTS)
        raise AugLocalError(exc.worded(words) + hints.get(exc.param, "")) from exc


def preflight(recipe: TrainRecipe, resume=None, overwrite: bool = False) -> Run:
    """Everything ``train`` checks and builds before its first step, in this process, writing nothing:
    the output folder, the device, the techniques, the data and the converted model; with ``resume``
    the checkpoint's record against the recipe and the net rebuilt from its plan. Returns the run
    (one process's view: a pipeline's stages are not built apart)."""
    check_run_folder(recipe.output, resume, overwrite, source=getattr(recipe, "source", None))
    saved = read_training(resume, weights=False) if resume else None
    if saved is not None:
        check_resume(saved["train"]["recipe"], recipe, resume)
    env = setup(recipe.device)
    try:
        with in_recipe_words(recipe), warnings.catch_warnings():
            warnings.simplefilter("ignore", AugLocalWarning)
            check_techniques(recipe, recipe.batch_size // env.world, env)
            return build_run(recipe, env, Plan.from_dict(saved["plan"]) if saved else None)
    finally:
        teardown(env)
