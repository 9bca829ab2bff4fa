"""Training recipes: a typed YAML schema, ``--set key=value`` overrides, one-line errors by key path.

The schema is a tree of dataclasses; their type hints are the type checks. A recipe is validated
completely before anything is built, so a typo fails in a second, not after the model converted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import AugLocalError
from ..models import is_reference
from ..options import options_of, recipe_name, validate
from ..plan import PlanConfig
from ..stages import STAGE_BALANCES
from .data import DATASETS
from .optim import OPTIMIZERS, SCHEDULES

__all__ = ["TrainRecipe", "ConversionSection", "conversion_options", "load_recipe", "recipe_from_dict",
           "apply_overrides", "RECIPE_KEYS"]

def _choices(registry):
    """Field metadata: the allowed values, read from ``registry`` (a dict or tuple) when a recipe is
    checked, so whatever is registered by then is a valid choice."""
    return {"choices": lambda: tuple(registry)}


def _at_least(low, hint: str = "", *, above: bool = False, most=None) -> dict:
    """Field metadata: the range of valid values (``above``: ``low`` itself excluded; ``most``: an upper
    bound), and a ``hint`` saying what to do instead. A value outside it would fail deep inside
    torch with a traceback, or worse, run and mean something else (``train_limit: 0`` used all)."""
    return {"low": low, "above": above, "most": most, "hint": hint}


_DEFAULT = "leave the key out (null) to use {}"


@dataclass
class ModelSection:
    # exactly one of name and factory: a timm name (resnet32_cifar and friends included), or your own
    # model as "package.module:function", any callable returning an nn.Module (called with kwargs)
    name: str | None = None
    factory: str | None = field(default=None, metadata={"check": lambda key, value: _check_reference(key, value)})
    # 0 would make timm drop the classifier (features taken as logits); cross-entropy needs 2 classes.
    # A factory gets num_classes / in_chans only if its signature names them (build.py model_kwargs)
    num_classes: int | None = field(default=None, metadata=_at_least(2, _DEFAULT.format("the dataset's classes")))
    in_chans: int | None = field(default=None, metadata=_at_least(1, _DEFAULT.format("the dataset's channels")))
    img_size: int | None = field(default=None, metadata=_at_least(1))  # for ViTs; passed to timm only when set
    pretrained: bool = False  # timm names only
    kwargs: dict = field(default_factory=dict)  # any other timm.create_model keyword, or the factory's keywords
    # start from these weights: a run's best.pt / last.pt (its backbone) or a timm / torch weights file;
    # how to train a finished run longer under a new schedule
    checkpoint: str | None = None

    @property
    def label(self) -> str:
        """What the run calls the model in its log, plot and summary: the timm name or the factory."""
        return self.name if self.name is not None else self.factory


def _check_reference(key: str, value) -> None:
    if value is not None and not (is_reference(value) and value.count(":") == 1 and all(value.split(":"))):
        raise AugLocalError(f"recipe key {key} is {value!r}; give package.module:function, e.g. "
                            "mypackage.models:make_net")


def _check_dataset(key: str, value) -> None:
    if value in DATASETS:
        return
    if not is_reference(value):
        raise AugLocalError(f"recipe key {key} is {value!r}; choose one of {', '.join(DATASETS)}, or give your own "
                            "as package.module:function")
    _check_reference(key, value)


def _check_val_split(key: str, value) -> None:
    if value is None:
        return
    if value < 0 or (isinstance(value, float) and value >= 1 and not value.is_integer()):
        raise AugLocalError(f"recipe key {key} must be a fraction in (0, 1) or a count of images >= 1, got {value}; "
                            "0 holds out none, null the dataset's default")


def _conversion_section() -> type:
    """The recipe's ``conversion:`` section: every planning option a recipe may set (``PlanConfig``'s
    fields with ``recipe=True``: the input size, classes and batch come from other sections), with
    the option's type, default and check. A recipe must name K, so ``blocks`` defaults to 8."""
    hints = typing.get_type_hints(PlanConfig)
    fields = []
    for f in options_of(PlanConfig):
        if f.metadata["recipe"]:
            default = 8 if f.name == "blocks" else f.default
            fields.append((f.name, hints[f.name], field(default=default, metadata=f.metadata)))
    return dataclasses.make_dataclass("ConversionSection", fields)


ConversionSection = _conversion_section()
# How a recipe names the library's parameters, for errors the library raises while building a run
RECIPE_KEYS = {f.name: recipe_name(f.name) for f in dataclasses.fields(ConversionSection)}


def conversion_options(recipe: TrainRecipe, **measured) -> PlanConfig:
    """The ``PlanConfig`` a recipe's ``conversion:`` section says, with what the run measures
    (``input_size``, ``batch``, ``model``) added."""
    return dataclasses.replace(PlanConfig(), **dataclasses.asdict(recipe.conversion), **measured)


@dataclass
class DataSection:
    # a built-in name, or your own data as "package.module:function" returning (train, test) or
    # (train, val, test) Datasets of (input, label) pairs, called with kwargs (data.py build_data)
    dataset: str = field(metadata={"check": _check_dataset})
    kwargs: dict = field(default_factory=dict)  # your dataset function's keywords
    # training images held out for validation (best.pt is chosen on them): a fraction in (0, 1) or a
    # count, drawn with a fixed seed from the (train_limit-cut) training set; 0: none; null: the
    # dataset's default (0.1 without an official validation set; imagefolder: none)
    val_split: int | float | None = field(default=None, metadata={"check": _check_val_split})
    root: str | None = None  # default: the Debian path for fashion_mnist, ~/.cache/auglocal-fx/data else
    download: bool = False
    image_size: int | None = field(default=None, metadata=_at_least(1, _DEFAULT.format("the dataset's own size")))
    augment: bool = True
    num_workers: int = field(default=2, metadata=_at_least(0, "0 loads the data in the main process"))
    # use only the first N training images (synthetic: the set size); null: all of them
    train_limit: int | None = field(default=None, metadata=_at_least(
        1, _DEFAULT.format("every training image") + " (0 does not mean all)"))
    test_limit: int | None = field(default=None, metadata=_at_least(
        1, _DEFAULT.format("every test image") + " (0 does not mean all)"))


@dataclass
class OptimizerSection:
    name: str = field(default="sgd", metadata=_choices(OPTIMIZERS))
    lr: float = field(default=0.1, metadata=_at_least(0, above=True))
    momentum: float = field(default=0.9, metadata=_at_least(0))  # sgd
    nesterov: bool = True  # sgd
    weight_decay: float = field(default=1e-4, metadata=_at_least(0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    # step each unit's parameters right after its backward and free its gradients (same updates,
    # at most one unit's gradients alive); false: one step after the whole training step
    per_unit: bool = True


@dataclass
class ScheduleSection:
    name: str = field(default="cosine", metadata=_choices(SCHEDULES))
    warmup_epochs: float = field(default=0.0, metadata=_at_least(0))
    # lr multiplier at step 0 of the linear warmup (torch's LinearLR takes (0, 1])
    warmup_start_factor: float = field(default=0.01, metadata=_at_least(0, above=True, most=1))
    min_lr: float = field(default=0.0, metadata=_at_least(0))  # cosine floor


@dataclass
class ParallelSection:
    # pipeline stages: contiguous groups of blocks, one per process, streaming activations forward
    # (training/strategies.py); torchrun starts pipeline x data-parallel replicas processes
    pipeline: int = field(default=1, metadata=_at_least(1))
    # split stages by measured step time, training FLOPs or block count (stages.py)
    balance: str = field(default="time", metadata=_choices(STAGE_BALANCES))


@dataclass
class MixupSection:
    """timm.data.Mixup: blend pairs of training images and their labels (off while both alphas are 0)."""
    mixup_alpha: float = field(default=0.0, metadata=_at_least(0))  # timm --mixup (0.8 in timm's recipes)
    cutmix_alpha: float = field(default=0.0, metadata=_at_least(0))  # timm --cutmix (1.0)
    prob: float = field(default=1.0, metadata=_at_least(0, most=1))  # of mixing a batch at all
    switch_prob: float = field(default=0.5, metadata=_at_least(0, most=1))  # cutmix instead of mixup, both on
    mode: str = field(default="batch", metadata=_choices(("batch", "pair", "elem")))


@dataclass
class TrainRecipe:
    model: ModelSection
    data: DataSection
    epochs: int = field(metadata=_at_least(1))
    batch_size: int = field(metadata=_at_least(1))  # global: split across processes under torchrun
    conversion: ConversionSection = field(default_factory=ConversionSection)  # planning options (PlanConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    eval_batch_size: int | None = field(default=None, metadata=_at_least(1, _DEFAULT.format("batch_size")))
    bf16: bool = False  # bf16 autocast for forward passes
    mixup: MixupSection = field(default_factory=MixupSection)
    label_smoothing: float = field(default=0.0, metadata=_at_least(0, most=0.99))  # of every loss's targets
    # exponential moving average of the weights, per unit (timm's ModelEmaV3): what is evaluated and
    # goes into best.pt; null: off; timm's recipes use 0.9998 (long runs), 0.99-0.999 for a few epochs
    ema_decay: float | None = field(default=None, metadata=_at_least(0, above=True, most=0.999999))
    clip_grad: float | None = field(default=None, metadata=_at_least(0, above=True))  # per unit, by norm
    channels_last: bool = False  # 4-d inputs and weights in channels-last memory format (faster convs)
    # torch.set_num_threads for a CPU run; null: torch's choice (all cores; 1 under torchrun, which sets
    # OMP_NUM_THREADS=1); give cores / processes when several share a machine
    threads: int | None = field(default=None, metadata=_at_least(1))
    tensorboard: bool = False  # also write TensorBoard events to <output>/tensorboard (pip install tensorboard)
    log_interval: int = field(default=50, metadata=_at_least(1))  # steps between progress lines and loss checks
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
