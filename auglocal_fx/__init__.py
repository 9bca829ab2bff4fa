"""auglocal-fx: compile any fx-traceable model into AugLocal's gradient-isolated local blocks.

Example:
    >>> import timm
    >>> from auglocal_fx import build_plan
    >>> plan = build_plan(timm.create_model("resnet50"), blocks=16)
    >>> print(len(plan.blocks), len(plan.aux))
    16 15
"""

from . import cifar_resnet  # noqa: F401  (registers resnet{20,32,56,110}_cifar with timm)
from .checkpoint import load_auglocal
from .convert import to_auglocal
from .errors import AugLocalError
from .export import export_onnx, save_backbone_state
from .net import AugLocalNet, StepOutput
from .pipeline import analyze_model, build_plan
from .plan import AuxRecipe, BlockInfo, LayerInfo, Plan, PlanConfig
from .recipe import pyramid_depths, select_layers
from .split import split_graph

__all__ = [
    "AugLocalError",
    "AugLocalNet",
    "StepOutput",
    "load_auglocal",
    "to_auglocal",
    "export_onnx",
    "save_backbone_state",
    "AuxRecipe",
    "BlockInfo",
    "LayerInfo",
    "Plan",
    "PlanConfig",
    "analyze_model",
    "build_plan",
    "pyramid_depths",
    "select_layers",
    "split_graph",
]
__version__ = "0.1.0"
