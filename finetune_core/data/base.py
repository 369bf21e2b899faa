"""What data is here: the error every data problem raises, what a spec holds, decoded
splits, and the folder that caches generated and downloaded data."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAMPLES_PER_CLASS = 8  # file paths per class in DataInfo.samples (the UI's sample grid)


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
    warnings: list[str] = field(default_factory=list)  # usable, but worth a look (say why)


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
    warnings: list[str] = field(default_factory=list)  # as DataInfo.warnings


def data_dir() -> Path:
    """Returns the folder for generated built-in data and torchvision downloads."""
    env = os.environ.get("FINETUNE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "finetune_dashboard" / "data"


def env_limit(name: str, default: int) -> int:
    """Returns the positive whole number the environment variable `name` sets, else default.

    Read at each use, so a server's setting reaches every process it starts; a value that
    is not a positive number is refused (a typo must not lift a limit)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        value = float("nan")
    if not value >= 1 or value == float("inf"):
        raise DataError(
            f"the environment variable {name}={text!r} is not a positive whole number; unset it "
            f"(default {default}) or give one, e.g. {name}={default}."
        )
    return int(value)


def class_counts(split: TensorSplit, num_classes: int) -> torch.Tensor:
    """Returns the number of images of each class in split, int64 [num_classes]."""
    return torch.bincount(split.labels.cpu(), minlength=num_classes)[:num_classes]
