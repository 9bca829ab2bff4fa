"""auglocal-fx: compile any fx-traceable model into AugLocal's gradient-isolated local blocks.

Importing the package registers the CIFAR ResNets (``resnet{20,32,56,110}_cifar``) with timm's
model registry, so ``timm.create_model("resnet32_cifar")`` works after ``import auglocal_fx``.

Example:
    >>> import timm
    >>> from auglocal_fx import build_plan
    >>> plan = build_plan(timm.create_model("resnet50"), blocks=16)
    >>> print(len(plan.blocks), len(plan.aux))
    16 15
"""

from . import cifar_resnet  # noqa: F401  (registers resnet{20,32,56,110}_cifar with timm)
from .compiler import load_auglocal, to_auglocal
from .errors import AugLocalError
from .export import export_onnx, save_backbone_state
from .plan import Plan, PlanConfig
from .planner import build_plan
from .runtime.blockwise import StepOutput
from .runtime.net import AugLocalNet

__all__ = [
    "AugLocalError",
    "AugLocalNet",
    "Plan",
    "PlanConfig",
    "StepOutput",
    "build_plan",
    "export_onnx",
    "load_auglocal",
    "save_backbone_state",
    "to_auglocal",
]
__version__ = "0.1.0"
