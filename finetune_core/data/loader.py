"""Batches: decoded tensors served in a seeded order per epoch, optionally class-balanced."""

from __future__ import annotations

import hashlib
import math

import torch

from finetune_core.data.base import TensorSplit


def _seed_for(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little")


def drops_last(n: int, batch_size: int) -> bool:
    """Returns True when training drops the last, short batch of an epoch: always, unless
    the data holds a single batch or less (then that batch is the epoch)."""
    return n > batch_size


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Returns the optimizer steps of a training epoch over n images."""
    return n // batch_size if drops_last(n, batch_size) else math.ceil(n / batch_size)


class TensorLoader:
    """Iterates (uint8 images [B,3,S,S], int64 labels [B]) over a TensorSplit.

    The order of epoch e depends only on (seed, e): call set_epoch(e) before iterating.
    `balanced` draws each batch with replacement, with class-balanced weights, for the same
    number of images per epoch. Batches come from the device the split's tensors are on.
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        balanced: bool = False,
        drop_last: bool = False,
        pin_memory: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.balanced = balanced
        self.drop_last = drop_last
        self.pin_memory = pin_memory and split.images.device.type == "cpu"
        self.epoch = 0
        self._weights = None
        if balanced and len(split):
            labels = split.labels.cpu()
            counts = torch.bincount(labels).double()
            self._weights = (1.0 / counts)[labels]

    def set_epoch(self, epoch: int) -> None:
        """Reseeds the order so that epoch e always sees the same batches."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.split)
        if self.drop_last:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def order(self) -> torch.Tensor:
        """Returns the indices of this epoch, in the order they are served."""
        n = len(self.split)
        g = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch))
        if self._weights is not None:
            return torch.multinomial(self._weights, n, replacement=True, generator=g)
        if self.shuffle:
            return torch.randperm(n, generator=g)
        return torch.arange(n)

    def __iter__(self):
        order = self.order().to(self.split.images.device)
        images, labels = self.split.images, self.split.labels
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x, y = images.index_select(0, idx), labels.index_select(0, idx)
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y
