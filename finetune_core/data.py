"""Dataset sources, splits, decode-once tensor datasets, tensor augmentation, safe zip import.

STUB: signatures are the contract other modules code against; the data helper fills them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


class DataError(ValueError):
    """Bad data input; the message says which file or folder and what to do."""


@dataclass
class DataInfo:
    """What a data spec holds, found without decoding images."""

    spec: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # {split or "all": {class: number of files}}
    has_splits: bool  # the folders give train/ and val/
    samples: dict[str, list[str]] = field(default_factory=dict)  # class -> a few file paths
    needs_download: bool = False  # torchvision:NAME not yet in the data folder


@dataclass
class TensorSplit:
    """Decoded images of one split: uint8 [N, 3, S, S] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageData:
    classes: list[str]
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit | None = None
    skipped_files: list[str] = field(default_factory=list)


def data_dir() -> Path:
    """Returns the folder for generated built-in data and torchvision downloads."""
    raise NotImplementedError


def inspect_data(spec: str) -> DataInfo:
    """Returns DataInfo for a spec; raises DataError when it does not exist or is unusable."""
    raise NotImplementedError


def check_split(info: DataInfo, val_fraction: float, test_fraction: float) -> str | None:
    """Returns a message when a class has too few images for the split, else None."""
    raise NotImplementedError


def load_data(
    spec: str,
    *,
    image_size: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    interpolation: str = "bilinear",
    progress=None,
) -> ImageData:
    """Returns the data decoded once to uint8 tensors at image_size, split stratified by seed."""
    raise NotImplementedError


class TensorLoader:
    """Iterates (uint8 images [B,3,S,S], int64 labels [B]) over a TensorSplit."""

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        balanced: bool = False,
        drop_last: bool = False,
    ):
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Reseeds the order so that epoch e always sees the same batches."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self):
        raise NotImplementedError


def augment_batch(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Returns uint8 images with `mode` (none | flip | crop) applied per image, same device."""
    raise NotImplementedError


def normalize(images: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    """Returns (images/255 - mean)/std as dtype."""
    raise NotImplementedError
