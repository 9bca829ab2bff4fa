"""Training recipes: a typed YAML schema, ``--set key=value`` overrides, one-line errors by key path.

The schema is a tree of dataclasses; their type hints are the type checks. A recipe is validated
completely before anything is built, so a typo fails in a second, not after the model converted.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..cuts import MAX_BUNDLE
from ..errors import AugLocalError
from ..partition import BALANCERS
from ..rules import RULES
from ..selection import TAILS
from ..synthesize import AUX_INITS
from .data import DATASETS
from .optim import OPTIMIZERS, SCHEDULES

__all__ = ["TrainRecipe", "load_recipe", "recipe_from_dict", "apply_overrides", "RECIPE_KEYS"]

# How a recipe names the library's parameters, for errors the library raises while building a run
RECIPE_KEYS = {name: f"recipe key conversion.{name} =" for name in
               ("blocks", "aux_depth", "pyramid", "balance", "tail", "rule", "aux_init", "max_bundle")}


def _choices(registry):
    """Field metadata: the allowed values, read from ``registry`` (a dict or tuple) when a recipe is
    checked, so whatever is registered by then is a valid choice."""
    return {"choices": lambda: tuple(registry)}


@dataclass
class ModelSection:
    name: str  # a timm name (resnet32_cifar and friends included)
    num_classes: int | None = None  # default: the dataset's classes
    in_chans: int | None = None  # default: the dataset's channels
    img_size: int | None = None  # for models that take it (ViTs); passed to timm only when set
    pretrained: bool = False
    kwargs: dict = field(default_factory=dict)  # any other timm.create_model keyword


@dataclass
class ConversionSection:
    rule: str = field(default="auglocal", metadata=_choices(RULES))
    blocks: int = 8
    aux_depth: int = 2
    pyramid: float = 0.5
    balance: str = field(default="layers", metadata=_choices(BALANCERS))
    tail: str = field(default="exact", metadata=_choices(TAILS))
    aux_init: str = field(default="fresh", metadata=_choices(AUX_INITS))
    max_bundle: int = MAX_BUNDLE  # the most tensors a cut between two layers may hand on


@dataclass
class DataSection:
    dataset: str = field(metadata=_choices(DATASETS))
    root: str | None = None  # default: the Debian path for fashion_mnist, ~/.cache/auglocal-fx/data else
    download: bool = False
    image_size: int | None = None  # resize to this; default: the dataset's own size
    augment: bool = True
    num_workers: int = 2
    train_limit: int | None = None  # use only the first N training images (synthetic: the set size)
    test_limit: int | None = None


@dataclass
class OptimizerSection:
    name: str = field(default="sgd", metadata=_choices(OPTIMIZERS))
    lr: float = 0.1
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw


@dataclass
class ScheduleSection:
    name: str = field(default="cosine", metadata=_choices(SCHEDULES))
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.01  # lr multiplier at step 0 of the linear warmup
    min_lr: float = 0.0  # cosine floor


@dataclass
class TrainRecipe:
    model: ModelSection
    data: DataSection
    epochs: int
    batch_size: int  # global: split across processes under torchrun
    conversion: ConversionSection = field(default_factory=ConversionSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    eval_batch_size: int | None = None  # default: batch_size
    bf16: bool = False  # bf16 autocast for forward passes
    seed: int = 0
    device: str = field(default="auto", metadata=_choices(("auto", "cpu", "cuda")))
    output: str | None = None  # default: runs/<recipe file name>

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- validation ----------------------------------------------------------------------------------
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "a mapping", list: "a list"}


def _describe(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _check(tp, value, path: str):
    """``value`` converted to ``tp``, or an AugLocalError naming ``path``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(arg, value, path)
            except AugLocalError:
                pass
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    elif origin is list and isinstance(value, list):
        return [_check(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else value
    elif tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML reads 1e-3 (no dot) as a string; users mean the number
    elif tp in (int, str, bool, dict) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise AugLocalError(f"recipe key {path} must be {_describe(tp)}, got {value!r}")


def _build(cls, data, path: str):
    where = f"recipe key {path}" if path else "a recipe"
    if not isinstance(data, dict):
        raise AugLocalError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(fields)}"
            raise AugLocalError(f"unknown recipe key {_join(path, key)}: {hint}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise AugLocalError(f"recipe key {key} is missing; add it (see recipes/ for examples)")
            continue
        value = _check(hints[name], data[name], key)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices():
            raise AugLocalError(f"recipe key {key} is {value!r}; choose one of {', '.join(choices())}")
        kwargs[name] = value
    return cls(**kwargs)


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def recipe_from_dict(data: dict) -> TrainRecipe:
    """Validate a parsed recipe; errors name the key path (``optimizer.lr``)."""
    recipe = _build(TrainRecipe, data, "")
    for key in ("epochs", "batch_size", "conversion.blocks"):
        value = recipe
        for part in key.split("."):
            value = getattr(value, part)
        if value < 1:
            raise AugLocalError(f"recipe key {key} must be at least 1, got {value}")
    if recipe.conversion.aux_depth < 0:
        raise AugLocalError(f"recipe key conversion.aux_depth must be 0 or more, got {recipe.conversion.aux_depth}")
    if not 0.0 <= recipe.conversion.pyramid <= 1.0:
        raise AugLocalError(f"recipe key conversion.pyramid must lie in [0, 1], got {recipe.conversion.pyramid}")
    return recipe


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` strings (values parsed as YAML: ``1e-3``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise AugLocalError(f"--set {item!r} is not key=value, e.g. --set optimizer.lr=0.05")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        node, parts = data, key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise AugLocalError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a mapping")
        node[parts[-1]] = value
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> TrainRecipe:
    """Read, override and validate a recipe file. ``output`` defaults to ``runs/<file name>``."""
    path = Path(path)
    if not path.is_file():
        raise AugLocalError(f"recipe {path} does not exist; see recipes/ for examples")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise AugLocalError(f"recipe {path} is not valid YAML{at}; fix the syntax") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AugLocalError(f"recipe {path} must be a YAML mapping (key: value), got {type(data).__name__}")
    recipe = recipe_from_dict(apply_overrides(data, list(overrides)))
    if recipe.output is None:
        recipe.output = str(Path("runs") / path.stem)
    return recipe
