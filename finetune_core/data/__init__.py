"""Data: specs and their sources, zip safety, decode-once tensors with a disk cache, splits,
the batch loader and batch augmentation.

Every image is decoded once with PIL, converted to RGB, resized (shorter side to the image
size, then a centre crop) and kept as uint8 [N, 3, S, S]. Training then only indexes
tensors and augments whole batches on tensors, so the input pipeline costs a small
fraction of a training step. Decoded tensors are cached on disk, keyed by the files'
names, sizes and modification times, so a second run on the same data starts at once.
"""

from finetune_core.data.augment import augment_batch, normalize
from finetune_core.data.base import (
    SAMPLES_PER_CLASS,
    DataError,
    DataInfo,
    ImageData,
    TensorSplit,
    class_counts,
    data_dir,
)
from finetune_core.data.decode import can_read, decode_image
from finetune_core.data.loader import TensorLoader, drops_last, steps_per_epoch
from finetune_core.data.sources import (
    BUILTIN,
    PREFIXES,
    inspect_data,
    load_data,
    resolve,
    unreadable_files,
)
from finetune_core.data.splits import check_split, split_sizes
from finetune_core.data.torchvision_sets import TORCHVISION

__all__ = [
    "BUILTIN",
    "PREFIXES",
    "SAMPLES_PER_CLASS",
    "TORCHVISION",
    "DataError",
    "DataInfo",
    "ImageData",
    "TensorLoader",
    "TensorSplit",
    "augment_batch",
    "can_read",
    "check_split",
    "class_counts",
    "data_dir",
    "decode_image",
    "drops_last",
    "inspect_data",
    "load_data",
    "normalize",
    "resolve",
    "split_sizes",
    "steps_per_epoch",
    "unreadable_files",
]
