"""``train(recipe)``: what ``auglocal-train`` runs, in one process or in each under torchrun.

It picks the trainer: ``loop.Trainer`` (every block in this process, data-parallel across
processes) or, with ``parallel.pipeline`` above 1, ``pipeline.PipelineTrainer`` (one stage of
blocks per process).
"""

from __future__ import annotations

from ..errors import AugLocalError
from .config import RECIPE_KEYS, TrainRecipe
from .distributed import setup, teardown
from .loop import Trainer, check_run_folder
from .pipeline import PipelineTrainer

__all__ = ["train"]

# the library's parameters as a recipe sets them: planning options are conversion keys; the input
# size comes from the data and model sections
_WORDS = {**RECIPE_KEYS, "input_size": "the input size that recipe keys model.in_chans and data.image_size give,"}
_HINTS = {"input_size": " (a ViT made for another size: set model.img_size to data.image_size)"}


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
    try:
        if recipe.parallel.pipeline > 1:
            trainer = PipelineTrainer(recipe, env, resume, log, overwrite)
        else:
            trainer = Trainer(recipe, env, resume, log, overwrite)
        summary = trainer.fit(stop_after)
        return summary if env.is_main else None
    except AugLocalError as exc:  # the library names its parameters; a recipe user knows the keys
        if exc.param in _WORDS:
            hint = _HINTS.get(exc.param, "")
            raise AugLocalError(exc.worded(_WORDS) + hint) from exc
        raise
    finally:
        teardown(env)
