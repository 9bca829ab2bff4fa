"""Datasets torchvision does not read as we need them: IDX files as Debian ships them, and synthetic images.

torchvision's FashionMNIST wants uncompressed files in its own folder layout; Debian's
``dataset-fashion-mnist`` installs the original gzipped IDX files, read here directly.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import AugLocalError

__all__ = ["IdxImages", "SyntheticImages", "Split", "read_idx"]

def read_idx(path: Path) -> torch.Tensor:
    """A uint8 IDX file (optionally ``.gz``) as a tensor: magic 0x000008NN, then NN big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":  # MNIST-style files are all uint8
            raise ValueError("not a uint8 IDX header")
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise AugLocalError(f"{path} is not a readable IDX file ({exc}); reinstall the dataset") from exc


class IdxImages(Dataset):
    """MNIST-style ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` files in one folder.

    Items are ``(uint8 tensor 1xHxW, int label)``, ready for torchvision.transforms.v2.
    """

    def __init__(self, root: str | Path, train: bool, transform=None):
        prefix = "train" if train else "t10k"
        self.images = read_idx(self._find(Path(root), f"{prefix}-images-idx3-ubyte")).unsqueeze(1)
        self.labels = read_idx(self._find(Path(root), f"{prefix}-labels-idx1-ubyte")).long()
        if len(self.images) != len(self.labels):
            raise AugLocalError(f"{root}: {len(self.images)} images but {len(self.labels)} labels; reinstall it")
        self.transform = transform

    @staticmethod
    def _find(root: Path, stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
        raise FileNotFoundError(root / stem)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.labels[i])


class SyntheticImages(Dataset):
    """Learnable random images for tests and smoke runs: one smooth template per class plus noise.

    Deterministic in ``seed``; the train, val and test sets share templates (``split`` changes the noise).
    """

    def __init__(self, size: int, num_classes: int, shape: tuple[int, int, int], seed: int = 0,
                 split: str = "train", transform=None):
        g = torch.Generator().manual_seed(seed)
        c, h, w = shape
        low = torch.rand(num_classes, c, max(h // 4, 1), max(w // 4, 1), generator=g)
        templates = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        g.manual_seed(seed + {"train": 1, "test": 2, "val": 3}[split])
        self.labels = torch.arange(size) % num_classes
        noise = torch.randn(size, c, h, w, generator=g) * 0.25
        self.images = ((templates[self.labels] + noise).clamp(0, 1) * 255).to(torch.uint8)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.labels[i])


class Split(Dataset):
    """Samples ``indices`` of ``base``, their inputs passed through ``transform``.

    How one training set serves both the training split (augmented) and the validation images
    held out of it (test-time transforms): ``base`` is made without a transform, and each split
    applies its own, so the set is loaded once.
    """

    def __init__(self, base: Dataset, indices, transform=None):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.base[int(self.indices[i])]
        return (self.transform(x) if self.transform is not None else x), y
