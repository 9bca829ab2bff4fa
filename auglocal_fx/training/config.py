"""Reading a training recipe: YAML (duplicate keys refused), ``--set key=value`` overrides, and every
value checked against the schema (``schema.py``) with one-line errors by key path.

A recipe is validated completely before anything is built, so a typo fails in a second, not after
the model converted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path

import yaml

from ..errors import AugLocalError
from ..options import validate
from .data import DATASETS
from .schema import (  # noqa: F401  re-exported: the recipe's names live where recipes are read
    RECIPE_KEYS,
    ConversionSection,
    DataSection,
    MixupSection,
    ModelSection,
    OptimizerSection,
    ParallelSection,
    ScheduleSection,
    TrainRecipe,
    conversion_options,
)

__all__ = ["TrainRecipe", "ConversionSection", "conversion_options", "load_recipe", "recipe_from_dict",
           "apply_overrides", "RECIPE_KEYS"]

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
        if not math.isfinite(value):  # YAML's .nan and .inf are floats too
            raise AugLocalError(f"recipe key {path} must be a finite number, got {value!r}")
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
        if f.metadata.get("option"):  # a planning option: checked as PlanConfig checks it (recipe_from_dict)
            kwargs[name] = value
            continue
        check = f.metadata.get("check")
        if check is not None:
            check(key, value)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices():
            raise AugLocalError(f"recipe key {key} is {value!r}; choose one of {', '.join(choices())}")
        if "low" in f.metadata and value is not None:
            _check_range(key, value, f.metadata)
        kwargs[name] = value
    return cls(**kwargs)


def _check_range(key: str, value, meta: dict) -> None:
    low, most = meta["low"], meta["most"]
    if meta["above"] and value <= low:
        wanted = f"above {low}"
    elif value < low:
        wanted = "0 or more" if low == 0 else f"at least {low}"
    elif most is not None and value > most:
        wanted = f"at most {most}"
    else:
        return
    hint = f"; {meta['hint']}" if meta["hint"] else ""
    raise AugLocalError(f"recipe key {key} must be {wanted}, got {value}{hint}")


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def recipe_from_dict(data: dict) -> TrainRecipe:
    """Validate a parsed recipe; errors name the key path (``optimizer.lr``)."""
    recipe = _build(TrainRecipe, data, "")
    _check_model_section(recipe.model)
    _check_data_section(recipe.data)
    betas = recipe.optimizer.betas
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise AugLocalError(f"recipe key optimizer.betas must be two numbers in [0, 1), got {betas}")
    try:
        validate(conversion_options(recipe))
    except AugLocalError as exc:
        raise AugLocalError(exc.worded(RECIPE_KEYS)) from exc
    return recipe


def _check_model_section(m: ModelSection) -> None:
    if m.name is None and m.factory is None:
        raise AugLocalError("recipe key model.name is missing; give a timm name, or model.factory: "
                            "package.module:function for your own model")
    if m.name is not None and m.factory is not None:
        raise AugLocalError(f"recipe keys model.name ({m.name!r}) and model.factory ({m.factory!r}) are both given; "
                            "keep one: a timm name or your own model's factory")
    if m.factory is not None and m.pretrained:
        raise AugLocalError("recipe key model.pretrained is for timm names; load your weights in model.factory, "
                            "or give them as model.checkpoint")


def _check_data_section(d: DataSection) -> None:
    if d.dataset in DATASETS:
        if d.kwargs:
            raise AugLocalError(f"recipe key data.kwargs is for a dataset given as package.module:function; "
                                f"{d.dataset} takes data.root, data.download, data.image_size and data.augment")
        return
    for key in ("root", "image_size"):  # the built-ins' keys: silently unused with your own data
        if getattr(d, key) is not None:
            raise AugLocalError(f"recipe key data.{key} is for the built-in datasets; pass what your dataset "
                                f"{d.dataset} needs in data.kwargs")
    if d.download:
        raise AugLocalError(f"recipe key data.download is for the built-in datasets; pass what your dataset "
                            f"{d.dataset} needs in data.kwargs")


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
    if path.is_dir():
        raise AugLocalError(f"recipe {path} is a folder; give a recipe file in it (YAML), see recipes/ for examples")
    if not path.is_file():
        raise AugLocalError(f"recipe {path} does not exist; see recipes/ for examples")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise AugLocalError(f"recipe {path} {exc}; keep one of them") from exc
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
    recipe.source = str(path)  # not a recipe key: the run checks it never writes over its own recipe
    return recipe


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives one key twice (PyYAML keeps the last,
    silently: ``lr: 0.1`` then ``lr: 0.01`` further down would train at 0.01 unseen)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(f"gives key {key!r} twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)
