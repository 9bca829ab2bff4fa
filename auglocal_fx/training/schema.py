"""What a training recipe may say: its sections as dataclasses, each field's type, default and check.

The type hints are the type checks and the field metadata the ranges and choices; ``config.py``
reads a YAML file (or a dict, or ``--set`` overrides) against this schema.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from ..errors import AugLocalError
from ..models import is_reference
from ..options import options_of, recipe_name
from ..plan import PlanConfig
from ..stages import STAGE_BALANCES
from .data import DATASETS
from .optim import OPTIMIZERS, SCHEDULES

__all__ = ["TrainRecipe", "ModelSection", "DataSection", "OptimizerSection", "ScheduleSection",
           "ParallelSection", "MixupSection", "ConversionSection", "conversion_options", "RECIPE_KEYS"]

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
    # exactly one of name and factory: a timm name (resnet32_cifar and friends included), hf:<type or hub
    # id> (a Hugging Face image classifier, kwargs its config's fields), or your own model as
    # "package.module:function", any callable returning an nn.Module (called with kwargs)
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
    # (training/pipeline_stages.py); torchrun starts pipeline x data-parallel replicas processes
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
    # each unit's whole step (forward, loss, backward, its optimizer update) replayed as one CUDA graph
    # (runtime/graphs.py): one launch per unit; needs device cuda, one process, optimizer.per_unit
    cuda_graphs: bool = False
    # aux: every aux net's weights and optimizer state in pinned host memory but for the unit training
    # and the next one (runtime/offload.py); needs device cuda, one process, optimizer.per_unit
    offload: str = field(default="none", metadata=_choices(("none", "aux")))
    # each block's forward beside the previous unit's aux net, backward and update, on two CUDA streams
    # (runtime/overlap.py): the same updates, one more block's activations held; device cuda, one process
    overlap: bool = False
    # torch.set_num_threads for a CPU run; null: torch's choice (all cores; 1 under torchrun, which sets
    # OMP_NUM_THREADS=1); give cores / processes when several share a machine
    threads: int | None = field(default=None, metadata=_at_least(1))
    # keep: glibc keeps the memory a step frees for the next step instead of faulting it back in every
    # step (runtime/host_memory.py); release: the C library's defaults
    host_memory: str = field(default="keep", metadata=_choices(("keep", "release")))
    tensorboard: bool = False  # also write TensorBoard events to <output>/tensorboard (pip install tensorboard)
    # also keep the last N epochs' checkpoints as <output>/epoch-NNNN.pt (0: last.pt and best.pt only)
    keep_checkpoints: int = field(default=0, metadata=_at_least(0))
    log_interval: int = field(default=50, metadata=_at_least(1))  # steps between progress lines and loss checks
    seed: int = 0
    device: str = field(default="auto", metadata=_choices(("auto", "cpu", "cuda")))
    output: str | None = None  # default: runs/<recipe file name>

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
