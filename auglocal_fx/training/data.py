"""Datasets by name, with the paper's augmentations (torchvision.transforms.v2) and sharded loaders.

Every dataset yields ``(image, label)``; the train loader shuffles with a ``DistributedSampler``
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
from .datasets import IdxImages, SyntheticImages

if TYPE_CHECKING:  # config's choices come from DATASETS, so config imports this module
    from .config import DataSection

__all__ = ["DATASETS", "DataBundle", "build_data", "train_loader", "eval_loader"]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEFAULT_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "auglocal-fx", "data")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CIFAR = (CIFAR_MEAN, CIFAR_STD)


def _crop(pad: int, flip: bool) -> Callable[[int], list]:
    """The paper's augmentation: reflect-pad, random crop back to size, optional horizontal flip."""
    def make(size: int) -> list:
        aug = [v2.RandomCrop(size, padding=pad, padding_mode="reflect")]
        return aug + ([v2.RandomHorizontalFlip()] if flip else [])

    return make


def _tv(cls_name: str, split_kw: Callable[[bool], dict]) -> Callable:
    def make(root: str, train: bool, download: bool, transform) -> Dataset:
        return getattr(tvd, cls_name)(root, download=download, transform=transform, **split_kw(train))

    return make


def _fashion_mnist(root: str, train: bool, download: bool, transform) -> Dataset:
    try:
        return IdxImages(root, train, transform)
    except FileNotFoundError:
        if not download:
            raise
    # online fallback, in torchvision's own folder layout
    return tvd.FashionMNIST(root, train=train, download=True, transform=transform)


def _imagefolder(root: str, train: bool, download: bool, transform) -> Dataset:
    split = Path(root) / ("train" if train else "val")
    if not split.is_dir():
        raise FileNotFoundError(split)
    return tvd.ImageFolder(str(split), transform=transform)


@dataclass(frozen=True)
class DatasetSpec:
    make: Callable  # (root, train, download, transform) -> Dataset
    channels: int
    classes: int | None  # None: read from the dataset (ImageFolder)
    size: int  # native side length
    stats: tuple  # (mean, std)
    augment: Callable[[int], list]  # size -> train-time transforms
    default_root: str = DEFAULT_ROOT
    missing_hint: str = "set data.download: true when online, or data.root to where it lives"
    photos: bool = False  # images of any size: test-time resize + centre crop, as ImageNet is evaluated
    generated: bool = False  # made on the fly (synthetic): takes any channel and class count

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
                               photos=True),
    "synthetic": DatasetSpec(None, 3, 10, 32, ((0.5,) * 3, (0.25,) * 3), lambda s: [v2.RandomHorizontalFlip()],
                             generated=True),
}


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    channels: int
    classes: int
    size: int


def _transforms(spec: DatasetSpec, size: int, train: bool, augment: bool):
    aug = spec.augment(size) if (train and augment) else []
    resize = []
    if spec.photos and not aug:  # photos of any size: the standard resize + centre crop
        resize = [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
    elif size != spec.size and not spec.photos:
        resize = [v2.Resize(size, antialias=True)]
    mean, std = spec.stats
    return v2.Compose([v2.ToImage(), *resize, *aug, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def build_data(cfg: DataSection, channels: int | None = None, classes: int | None = None) -> DataBundle:
    """Both splits of ``cfg.dataset``, transformed; ``channels``/``classes`` shape the synthetic set."""
    spec = DATASETS[cfg.dataset]
    size = cfg.image_size or spec.size
    tf = {t: _transforms(spec, size, t, cfg.augment) for t in (True, False)}
    if spec.generated:
        shape = (channels or spec.channels, size, size)
        n_cls = classes or spec.classes
        train = SyntheticImages(cfg.train_limit or 512, n_cls, shape, split="train", transform=tf[True])
        test = SyntheticImages(cfg.test_limit or 256, n_cls, shape, split="test", transform=tf[False])
        return DataBundle(train, test, shape[0], n_cls, size)
    root = cfg.root or spec.default_root
    try:
        train = spec.make(root, True, cfg.download, tf[True])
        test = spec.make(root, False, cfg.download, tf[False])
    except (FileNotFoundError, RuntimeError) as exc:  # torchvision: RuntimeError "Dataset not found"
        if isinstance(exc, RuntimeError) and "not found" not in str(exc).lower():
            raise
        raise AugLocalError(f"{cfg.dataset} not found in {root}: {spec.missing_hint}") from exc
    except OSError as exc:  # download failed: offline
        raise AugLocalError(f"could not download {cfg.dataset} ({exc}); set data.root to a local copy") from exc
    n_cls = spec.classes or len(train.classes)
    if cfg.train_limit:
        train = Subset(train, range(min(cfg.train_limit, len(train))))
    if cfg.test_limit:
        test = Subset(test, range(min(cfg.test_limit, len(test))))
    return DataBundle(train, test, spec.channels, n_cls, size)


def train_loader(ds: Dataset, batch: int, workers: int, seed: int, rank: int, world: int,
                 pin: bool = False) -> DataLoader:
    """Shuffled per epoch (call ``loader.sampler.set_epoch``); this rank's share of each global batch."""
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=pin, generator=torch.Generator())  # seeded per epoch by the loop


def eval_loader(ds: Dataset, batch: int, workers: int, rank: int, world: int, pin: bool = False) -> DataLoader:
    """Every test image exactly once across the ranks (strided shards, no padding)."""
    shard = Subset(ds, range(rank, len(ds), world)) if world > 1 else ds
    return DataLoader(shard, batch_size=batch, shuffle=False, num_workers=workers, pin_memory=pin)
