"""Data: specs and their sources, zip safety, decode-once tensors with a disk cache, splits,
the batch loader and batch augmentation.

Every image is decoded once with PIL, converted to RGB, resized (shorter side to the image
size, then a centre crop) and kept as uint8 [N, 3, S, S]. Training then only indexes
tensors and augments whole batches on tensors, so the input pipeline costs a small
fraction of a training step. Decoded tensors are cached on disk, keyed by the files'
names, sizes and modification times, so a second run on the same data starts at once.

Data comes from strangers: zips are checked before anything is written (zips.py), images
are opened only in the formats listed and within a pixel limit (decode.py), folder walks
follow no links to folders and are bounded (folders.py); every limit names the environment
variable that sets it for a server. `DataInfo.warnings` lists what is usable but worth a look.
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
from finetune_core.data.decode import IMAGE_FORMATS, can_read, decode_image, image_problem
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
from finetune_core.data.zips import extract_zip, prune_extractions

__all__ = [
    "BUILTIN",
    "IMAGE_FORMATS",
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
    "extract_zip",
    "image_problem",
    "inspect_data",
    "load_data",
    "normalize",
    "prune_extractions",
    "resolve",
    "split_sizes",
    "steps_per_epoch",
    "unreadable_files",
]
