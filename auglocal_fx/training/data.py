"""Datasets by name, with the paper's augmentations (torchvision.transforms.v2), your own datasets by
``package.module:function``, the validation split, and sharded loaders.

Every dataset yields ``(input, label)``; the train loader shuffles with a ``DistributedSampler``
even in one process, so a run on N processes sees, step by step, the same global batches as a run
on one (the union of the ranks' shards is the single-process batch).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision.datasets as tvd
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import v2

from ..cifar_resnet import CIFAR_MEAN, CIFAR_STD
from ..errors import AugLocalError
from ..models import call_with, import_object
from .datasets import IdxImages, Split, SyntheticImages

if TYPE_CHECKING:  # config's choices come from DATASETS, so config imports this module
    from .config import DataSection

__all__ = ["DATASETS", "DataBundle", "VAL_SEED", "build_data", "held_out", "train_loader", "eval_loader"]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEFAULT_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "auglocal-fx", "data")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CIFAR = (CIFAR_MEAN, CIFAR_STD)
# The validation images are drawn with this seed, not the run's: runs with different seeds (a seed
# study, a resumed run, a baseline beside AugLocal) then choose their best epoch on the same images.
VAL_SEED = 0
# data.val_split left out (null), for a dataset without an official validation set: a tenth of the
# training images (Fashion-MNIST, CIFAR: 6000 / 5000 of 60000 / 50000, the usual hold-out)
DEFAULT_VAL_SPLIT = 0.1
# the synthetic set's sizes when train_limit / test_limit are left out
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 512, 256


def _crop(pad: int, flip: bool) -> Callable[[int], list]:
    """The paper's augmentation: reflect-pad, random crop back to size, optional horizontal flip."""
    def make(size: int) -> list:
        aug = [v2.RandomCrop(size, padding=pad, padding_mode="reflect")]
        return aug + ([v2.RandomHorizontalFlip()] if flip else [])

    return make


def _tv(cls_name: str, split_kw: Callable[[bool], dict]) -> Callable:
    def make(root: str, split: str, download: bool, transform) -> Dataset:
        return getattr(tvd, cls_name)(root, download=download, transform=transform, **split_kw(split == "train"))

    return make


def _fashion_mnist(root: str, split: str, download: bool, transform) -> Dataset:
    try:
        return IdxImages(root, split == "train", transform)
    except FileNotFoundError:
        if not download:
            raise
    # online fallback, in torchvision's own folder layout
    return tvd.FashionMNIST(root, train=split == "train", download=True, transform=transform)


def _imagefolder_has_val(root: str) -> bool:
    """train/, val/ and test/: val/ is a validation set. train/ and val/ only (ImageNet as it is
    reported): val/ is the test set, and there is no validation set unless data.val_split asks."""
    return (Path(root) / "test").is_dir()


def _imagefolder(root: str, split: str, download: bool, transform) -> Dataset:
    if split == "test" and not _imagefolder_has_val(root):
        split = "val"
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(folder)
    return tvd.ImageFolder(str(folder), transform=transform)


@dataclass(frozen=True)
class DatasetSpec:
    make: Callable  # (root, split: "train" / "val" / "test", download, transform) -> Dataset
    channels: int
    classes: int | None  # None: read from the dataset (ImageFolder)
    size: int  # native side length
    stats: tuple  # (mean, std)
    augment: Callable[[int], list]  # size -> train-time transforms
    default_root: str = DEFAULT_ROOT
    missing_hint: str = "set data.download: true when online, or data.root to where it lives"
    photos: bool = False  # images of any size: test-time resize + centre crop, as ImageNet is evaluated
    generated: bool = False  # made on the fly (synthetic): takes any channel and class count
    has_val: Callable[[str], bool] | None = None  # root -> whether make(root, "val", ...) is an official val set
    # data.val_split left out: the fraction held out (no official validation set) or 0
    default_val_split: float = DEFAULT_VAL_SPLIT

DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        _fashion_mnist, 1, 10, 28, ((0.2860,), (0.3530,)), _crop(2, True), DEBIAN_FASHION_MNIST,
        "install it offline with `apt-get install dataset-fashion-mnist`, or set data.download: true when online"),
    "cifar10": DatasetSpec(_tv("CIFAR10", lambda t: {"train": t}), 3, 10, 32, _CIFAR, _crop(4, True)),
    "cifar100": DatasetSpec(_tv("CIFAR100", lambda t: {"train": t}), 3, 100, 32, _CIFAR, _crop(4, True)),
    "svhn": DatasetSpec(_tv("SVHN", lambda t: {"split": "train" if t else "test"}), 3, 10, 32,
                        ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)), _crop(2, False)),
    "stl10": DatasetSpec(_tv("STL10", lambda t: {"split": "train" if t else "test"}), 3, 10, 96,
                         ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)), _crop(4, True)),
    "imagefolder": DatasetSpec(_imagefolder, 3, None, 224, _IMAGENET,
                               lambda s: [v2.RandomResizedCrop(s, antialias=True), v2.RandomHorizontalFlip()],
                               missing_hint="point data.root at a folder with train/ and val/ class folders",
                               photos=True, has_val=_imagefolder_has_val, default_val_split=0.0),
    "synthetic": DatasetSpec(None, 3, 10, 32, ((0.5,) * 3, (0.25,) * 3), lambda s: [v2.RandomHorizontalFlip()],
                             generated=True),
}


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    channels: int | None  # the images' channels; None: inputs that are not C x H x W images
    classes: int
    size: int | None  # a built-in's image side (data.image_size); None for your own data (see input_size)
    val: Dataset | None = None  # held-out training images (test-time transforms) or an official val set
    input_size: list[int] | None = None  # one input's shape, without the batch
    # your own data: its first training input, batch first (the conversion plans the model on it:
    # to_auglocal's example_inputs, so token ids stay int64); None for the built-ins (random images)
    example: torch.Tensor | None = None
    stats: tuple | None = None  # (mean, std) the built-ins normalise with; None for your own data


def _transforms(spec: DatasetSpec, size: int, train: bool, augment: bool):
    aug = spec.augment(size) if (train and augment) else []
    resize = []
    if spec.photos and not aug:  # photos of any size: the standard resize + centre crop
        resize = [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
    elif size != spec.size and not spec.photos:
        resize = [v2.Resize(size, antialias=True)]
    mean, std = spec.stats
    return v2.Compose([v2.ToImage(), *resize, *aug, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def held_out(val_split, n: int, default: float, name: str, limited: bool = False) -> int:
    """How many of ``n`` training images ``val_split`` holds out (null: ``default``): a fraction in
    (0, 1) (rounded, at least one image) or a count; at least one image must be left to train on."""
    value = default if val_split is None else val_split
    if not value:
        return 0
    k = max(1, round(value * n)) if value < 1 else int(value)
    if k >= n:
        given = f"{value} (the default for {name})" if val_split is None else f"{value}"
        of = f"the {n} training images data.train_limit keeps" if limited else f"{name}'s {n} training images"
        raise AugLocalError(f"recipe key data.val_split = {given} holds out {k} of {of}, leaving none to train on; "
                            "give a smaller fraction or count, or 0 for no validation split")
    return k


def split_indices(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` indices into ``range(n)``: ``k`` drawn for validation by a permutation seeded
    with ``VAL_SEED``, each side in ascending order (the train loader shuffles by the run's seed)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))
    return perm[k:].sort().values, perm[:k].sort().values


def _split_train(base: Dataset, cfg: DataSection, default: float, name: str, train_tf=None, eval_tf=None):
    """``(train, val)`` from ``base`` (made without a transform): the first ``train_limit`` images,
    then ``val_split`` of them held out. The held-out images get ``eval_tf`` (no augmentation)."""
    n = min(cfg.train_limit, len(base)) if cfg.train_limit else len(base)
    k = held_out(cfg.val_split, n, default, name, limited=bool(cfg.train_limit) and n < len(base))
    if k == 0:
        return Split(base, range(n), train_tf), None
    train_idx, val_idx = split_indices(n, k)
    return Split(base, train_idx, train_tf), Split(base, val_idx, eval_tf)


def _limit(ds: Dataset, limit: int | None) -> Dataset:
    return Subset(ds, range(min(limit, len(ds)))) if limit else ds


def build_data(cfg: DataSection, channels: int | None = None, classes: int | None = None) -> DataBundle:
    """The splits of ``cfg.dataset``, transformed; ``channels``/``classes`` shape the synthetic set,
    and ``classes`` is the class count of your own data when it does not say (a ``classes`` attribute)."""
    if cfg.dataset not in DATASETS:
        return _own_data(cfg, classes)
    spec = DATASETS[cfg.dataset]
    size = cfg.image_size or spec.size
    tf = {t: _transforms(spec, size, t, cfg.augment) for t in (True, False)}
    if spec.generated:  # generated: the validation images are a third draw; the training set keeps its size
        shape = (channels or spec.channels, size, size)
        n_cls = classes or spec.classes
        n = cfg.train_limit or SYNTHETIC_TRAIN
        value = spec.default_val_split if cfg.val_split is None else cfg.val_split
        k = (max(1, round(value * n)) if value < 1 else int(value)) if value else 0
        train = SyntheticImages(n, n_cls, shape, split="train", transform=tf[True])
        val = SyntheticImages(k, n_cls, shape, split="val", transform=tf[False]) if k else None
        test = SyntheticImages(cfg.test_limit or SYNTHETIC_TEST, n_cls, shape, split="test", transform=tf[False])
        return DataBundle(train, test, shape[0], n_cls, size, val=val, input_size=list(shape), stats=spec.stats)
    root = cfg.root or spec.default_root
    official = spec.has_val is not None and spec.has_val(root)
    if official and cfg.val_split:
        raise AugLocalError(f"recipe key data.val_split is {cfg.val_split} but {cfg.dataset} in {root} has its own "
                            "validation set (val/ beside test/); leave data.val_split out")
    try:
        base = spec.make(root, "train", cfg.download, None)  # each split below applies its transforms
        val = spec.make(root, "val", cfg.download, tf[False]) if official else None
        test = spec.make(root, "test", cfg.download, tf[False])
    except (FileNotFoundError, RuntimeError) as exc:  # torchvision: RuntimeError "Dataset not found"
        if isinstance(exc, RuntimeError) and "not found" not in str(exc).lower():
            raise
        raise AugLocalError(f"{cfg.dataset} not found in {root}: {spec.missing_hint}") from exc
    except OSError as exc:  # download failed: offline
        raise AugLocalError(f"could not download {cfg.dataset} ({exc}); set data.root to a local copy") from exc
    n_cls = spec.classes or len(base.classes)
    if official:
        train, _ = _split_train(base, cfg, 0.0, cfg.dataset, tf[True])
    else:
        train, val = _split_train(base, cfg, spec.default_val_split, cfg.dataset, tf[True], tf[False])
    return DataBundle(train, _limit(test, cfg.test_limit), spec.channels, n_cls, size, val=val,
                      input_size=[spec.channels, size, size], stats=spec.stats)


# -- your own data ----------------------------------------------------------------------------------
def _own_data(cfg: DataSection, classes: int | None) -> DataBundle:
    """``cfg.dataset`` (``package.module:function``) called with ``cfg.kwargs``: it returns
    ``(train, test)`` or ``(train, val, test)`` map-style Datasets of ``(input tensor, label)``
    pairs (val may be None). What the model takes is read from the first training input."""
    what, ref = "recipe key data.dataset", cfg.dataset
    fn = import_object(ref, what)
    out = call_with(fn, dict(cfg.kwargs), what, ref, "data.kwargs")
    if not isinstance(out, tuple | list) or len(out) not in (2, 3):
        got = f"{len(out)} values" if isinstance(out, tuple | list) else f"a {type(out).__name__}"
        raise AugLocalError(f"{what} {ref!r} returned {got}; return (train, test) or (train, val, test) Datasets")
    train, val, test = out if len(out) == 3 else (out[0], None, out[1])
    for name, ds in (("train", train), ("val", val), ("test", test)):
        if ds is None and name == "val":
            continue
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            got = "None" if ds is None else f"a {type(ds).__name__}"
            raise AugLocalError(f"{what} {ref!r} returned {got} as its {name} set; return map-style Datasets (with "
                                "__len__ and __getitem__, e.g. torch.utils.data.TensorDataset)")
        if len(ds) == 0:
            raise AugLocalError(f"{what} {ref!r} returned an empty {name} set; it needs at least one sample")
    x0 = _first_input(train, what, ref, "train")
    for name, ds in (("val", val), ("test", test)):
        if ds is not None and (x := _first_input(ds, what, ref, name)).shape != x0.shape:
            raise AugLocalError(f"{what} {ref!r}: the {name} set's inputs are {tuple(x.shape)}, the training set's "
                                f"{tuple(x0.shape)}; give every sample the same shape")
    declared = _classes_of(train)
    if classes is not None and declared is not None and classes < declared:  # its labels would pass the logits
        raise AugLocalError(f"the recipe gives {classes} classes (model.num_classes or model.kwargs.num_classes) but "
                            f"{what} {ref!r} has {declared} (its classes attribute); remove it or give at least {declared}")
    n_cls = classes or declared
    if n_cls is None:
        raise AugLocalError(f"{what} {ref!r}: the number of classes is unknown; set recipe key model.num_classes, "
                            "or give the training set a classes attribute (a list of class names, as torchvision's "
                            "datasets have)")
    if val is not None and cfg.val_split:
        raise AugLocalError(f"recipe key data.val_split is {cfg.val_split} but {ref} returns its own validation set; "
                            "leave data.val_split out, or return (train, test)")
    if val is None:  # held out of the training set: its transforms (yours) apply to them too
        train, val = _split_train(train, cfg, DEFAULT_VAL_SPLIT, ref)
    elif cfg.train_limit:
        train = _limit(train, cfg.train_limit)
    channels = x0.shape[0] if x0.dim() == 3 and x0.is_floating_point() else None
    return DataBundle(train, _limit(test, cfg.test_limit), channels, n_cls, None, val=val,
                      input_size=list(x0.shape), example=x0.unsqueeze(0))


def _first_input(ds: Dataset, what: str, ref: str, name: str) -> torch.Tensor:
    sample = ds[0]
    if not isinstance(sample, tuple | list) or len(sample) != 2:
        got = f"{len(sample)} values" if isinstance(sample, tuple | list) else f"a {type(sample).__name__}"
        raise AugLocalError(f"{what} {ref!r}: a {name} sample is {got}; samples are (input, label) pairs")
    x, y = sample
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        hint = ("add a transform that makes tensors (torchvision.transforms.v2.ToImage, ToDtype)"
                if not isinstance(x, tuple | list) else "the trainer feeds the model one tensor per sample")
        raise AugLocalError(f"{what} {ref!r}: a {name} sample's input is a {type(x).__name__}, not a tensor "
                            f"with at least one axis; {hint}")
    if not (isinstance(y, int) or (isinstance(y, torch.Tensor) and y.dim() == 0 and not y.is_floating_point())):
        raise AugLocalError(f"{what} {ref!r}: a {name} sample's label is {y!r}; labels are class indices (int)")
    return x


def _classes_of(ds: Dataset) -> int | None:
    for d in (ds, getattr(ds, "dataset", None)):  # a Subset: its dataset's classes
        c = getattr(d, "classes", None)
        if isinstance(c, int) and not isinstance(c, bool):
            return c
        if c is not None and hasattr(c, "__len__") and not isinstance(c, str):
            return len(c)
    return None


def train_loader(ds: Dataset, batch: int, workers: int, seed: int, rank: int, world: int,
                 pin: bool = False) -> DataLoader:
    """Shuffled per epoch (call ``loader.sampler.set_epoch``); this rank's share of each global batch."""
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=pin, generator=torch.Generator())  # seeded per epoch by the loop


def eval_loader(ds: Dataset, batch: int, workers: int, rank: int, world: int, pin: bool = False) -> DataLoader:
    """Every test (or validation) sample exactly once across the ranks (strided shards, no padding)."""
    shard = Subset(ds, range(rank, len(ds), world)) if world > 1 else ds
    return DataLoader(shard, batch_size=batch, shuffle=False, num_workers=workers, pin_memory=pin)
