"""Training converted models: recipes, data, the block-wise loop, checkpoints, DDP.

Example:
    >>> from auglocal_fx.training import load_recipe, train
    >>> summary = train(load_recipe("recipes/fashion_mnist_auglocal.yaml", ["epochs=1"]))
"""

from .config import TrainRecipe, apply_overrides, load_recipe, recipe_from_dict
from .trainer import train

__all__ = ["TrainRecipe", "apply_overrides", "load_recipe", "recipe_from_dict", "train"]
