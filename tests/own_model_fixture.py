"""A model and datasets of one's own, named in recipes as ``own_model_fixture:<function>`` (tests put
``tests/`` on the path: pytest in-process, ``PYTHONPATH=tests`` for a subprocess).

``small_cnn`` / ``blobs``: 3x8x8 float images, classes from the dataset's ``classes`` attribute.
``token_classifier`` / ``token_ids``: int64 token ids (not images), an official validation set.
The rest are the mistakes a recipe can make, for the error tests.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


def small_cnn(num_classes: int = 4, width: int = 8) -> nn.Module:
    """Three conv layers and a classifier: three blocks' worth of layers."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class Blobs(Dataset):
    """``n`` 3x8x8 images: a class-dependent mean plus noise (learnable in an epoch); ``transform``
    applies to the input, so a test can see which transform a sample went through."""

    classes = ["a", "b", "c", "d"]

    def __init__(self, n: int, seed: int, transform=None):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % len(self.classes)
        self.images = self.labels[:, None, None, None].float() + 0.3 * torch.randn(n, 3, 8, 8, generator=g)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), int(self.labels[i])


def blobs(n: int = 64, test: int = 32):
    """``(train, test)``: no validation set of its own, so data.val_split holds one out of train."""
    return Blobs(n, seed=1), Blobs(test, seed=2)


def two_score_cnn(width: int = 8) -> nn.Module:
    """``small_cnn`` made for 2 classes whatever the data has (it takes no num_classes)."""
    return small_cnn(2, width)


def mislabelled(n: int = 64, test: int = 32):
    """``blobs`` whose training set has one label past its classes (4, for classes a..d): a data bug."""
    train, test_set = blobs(n, test)
    train.labels[n // 2] = len(train.classes)
    return train, test_set


def with_nan(n: int = 64, test: int = 32):
    """``blobs`` whose training images hold a NaN from the 40th on (a transform that divides by a zero std)."""
    train, test_set = blobs(n, test)
    train.images[40:, 0, 0, 0] = float("nan")
    return train, test_set


class TokenIds(Dataset):
    """Sequences of 12 int64 token ids; the class is which quarter of the vocabulary dominates."""

    def __init__(self, n: int, seed: int, vocab: int = 32):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 4
        low = self.labels[:, None] * (vocab // 4)
        self.ids = low + torch.randint(0, vocab // 4, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.ids[i], int(self.labels[i])


def token_ids(n: int = 64):
    """``(train, val, test)``: an official validation set; no ``classes`` (the recipe gives them)."""
    return TokenIds(n, 1), TokenIds(32, 3), TokenIds(32, 2)


class _MeanPool(nn.Module):
    def forward(self, x):
        return x.mean(1)


def token_classifier(num_classes: int = 4, vocab: int = 32, dim: int = 16) -> nn.Module:
    """Embedding -> two MLP layers over tokens -> mean -> classifier; takes int64 ids (N, T)."""
    return nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(),
                         _MeanPool(), nn.Linear(dim, num_classes))


# -- mistakes --------------------------------------------------------------------------------------
NOT_CALLABLE = 3


def not_a_module():
    return {"weights": 1}


def one_dataset():
    return Blobs(8, seed=1)


def unlabelled():
    """Samples that are bare tensors, not (input, label) pairs."""
    return torch.zeros(8, 3, 8, 8), torch.zeros(4, 3, 8, 8)
