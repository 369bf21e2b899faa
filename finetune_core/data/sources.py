"""Data specs: each form (a folder, a .zip, builtin:NAME, torchvision:NAME) resolves to a
source that can be inspected without decoding and decoded once; `load_data` splits it.

A data spec is one of: a folder in ImageFolder layout (class subfolders, optionally under
train/, val/ and test/), a `.zip` of such a folder, `builtin:shapes` / `builtin:shapes-source`
(generated PNG folders, see shapes.py), or `torchvision:NAME`.
"""

from __future__ import annotations

import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from finetune_core.data import shapes, torchvision_sets
from finetune_core.data.base import DataError, DataInfo, ImageData, TensorSplit, data_dir
from finetune_core.data.decode import resample
from finetune_core.data.folders import (
    FolderSource,
    dataset_root,
    index_folder,
    refuse_system_path,
)
from finetune_core.data.splits import carve, check_split, split_indices
from finetune_core.data.torchvision_sets import TORCHVISION, TorchvisionSource
from finetune_core.data.zips import extract_zip

BUILTIN = tuple(shapes.DATASETS)  # builtin:NAME choices
_SPEC_FORMS = (
    "a folder with one subfolder per class (optionally under train/, val/, test/), "
    "a .zip of such a folder, builtin:shapes, builtin:shapes-source, or torchvision:NAME "
    "(NAME one of {names})"
)

Source = FolderSource | TorchvisionSource


def _builtin(spec: str, name: str, progress) -> FolderSource:
    if name not in BUILTIN:
        raise DataError(
            f"unknown built-in dataset {name!r}; choose "
            + " or ".join(f"builtin:{n}" for n in BUILTIN)
            + "."
        )
    if progress is not None and not (data_dir() / "builtin" / shapes.folder_name(name)).is_dir():
        progress("data", None, f"generating builtin:{name} (first use, a few seconds)")
    root = shapes.ensure(name, data_dir() / "builtin", progress=progress)
    return FolderSource(spec, index_folder(root, spec.strip()))


def _torchvision(spec: str, name: str, progress) -> TorchvisionSource:
    return TorchvisionSource(spec, torchvision_sets.find(name))


def _path(spec: str, path: Path, progress=None) -> FolderSource:
    refuse_system_path(path, str(path))
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise DataError(f"data path {path} cannot be read ({e.strerror or e}).") from e
    if stat.S_ISREG(mode):
        if not zipfile.is_zipfile(path):
            raise DataError(
                f"{path} is a file but not a .zip; give a folder with one subfolder per class, "
                f"or a .zip of such a folder."
            )
        label = path.name  # the zip's own name: its extraction folder is the server's
        report = None if progress is None else (lambda f, msg: progress("data", f, msg))
        folder = extract_zip(path, label, progress=report)
        return FolderSource(spec, index_folder(dataset_root(folder), label))
    if not stat.S_ISDIR(mode):
        raise DataError(
            f"data path {path} is not a regular file or folder (a device, pipe or socket); "
            f"give a folder with one subfolder per class, or a .zip of such a folder."
        )
    return FolderSource(spec, index_folder(path, str(path)))


# spec prefix -> resolver(spec, the rest after "prefix:", progress)
PREFIXES: dict[str, Callable[[str, str, object], Source]] = {
    "builtin": _builtin,
    "torchvision": _torchvision,
}


def _spec_forms() -> str:
    return _SPEC_FORMS.format(names=", ".join(TORCHVISION)) + "."


def resolve(spec: str, progress=None) -> Source:
    """Returns the source a spec names; raises DataError saying what forms a spec takes."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("no data given; " + _spec_forms())
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    if sep and kind in PREFIXES:
        return PREFIXES[kind](spec, rest, progress)
    if "\0" in text:
        raise DataError(
            f"data path {text!r} holds a NUL character (\\0), which no file name can; "
            f"retype the path."
        )
    path = Path(text).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError) as e:
        raise DataError(f"data path {text!r} cannot be used ({e}); give " + _spec_forms()) from e
    if not exists:
        if sep and len(kind) > 1 and kind.isidentifier():
            raise DataError(f"unknown data spec form {kind + ':'!r} in {text!r}; " + _spec_forms())
        raise DataError(f"data path {path} does not exist; give " + _spec_forms())
    return _path(spec, path, progress)


def inspect_data(spec: str) -> DataInfo:
    """Returns DataInfo for a spec; raises DataError when it does not exist or is unusable.

    Decodes nothing and downloads nothing (needs_download says a torchvision dataset is not
    there yet). It does extract a .zip and generate a built-in dataset into the data folder
    the first time, since both are caches that the run needs anyway.
    """
    return resolve(spec).inspect()


def unreadable_files(spec: str) -> list[str]:
    """Returns the files of a spec that are not readable images (they are skipped when the
    run decodes the data), relative to the data's folder; reads headers, decodes nothing."""
    return resolve(spec).unreadable()


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
    if image_size < 1:
        raise DataError(f"image size must be a positive number of pixels, got {image_size}.")
    resample(interpolation)
    source = resolve(spec, progress)
    classes, images, labels, tags, keep, skipped = source.decode(
        image_size, interpolation, progress
    )
    label = source.label
    tag_of = np.asarray(tags, dtype=object)
    for c, cls in enumerate(classes):
        if not bool(((labels == c) & keep).any()):
            raise DataError(
                f"class {cls!r} of {label} has no readable image: every file of it was skipped "
                f"as unreadable, truncated or not an image. Add images to it or remove it."
            )
    splits: dict[str, torch.Tensor] = {}
    for s in ("all", "train", "val", "test"):
        mask = torch.from_numpy(tag_of == s) & keep
        if bool(mask.any()) or s in tags:
            splits[s] = torch.nonzero(mask).flatten()
    counts = {
        s: {c: int((labels[i] == k).sum()) for k, c in enumerate(classes)}
        for s, i in splits.items()
    }
    pool, carve_val, carve_test = carve(counts)
    msg = check_split(
        DataInfo(spec, list(classes), counts, "val" in counts), val_fraction, test_fraction
    )
    if msg:
        if skipped:
            msg += f" ({len(skipped)} unreadable files were skipped.)"
        raise DataError(msg)
    vf = val_fraction if carve_val else 0.0
    tf = test_fraction if carve_test else 0.0
    pool_idx = splits[pool]
    tr, va, te = split_indices(labels[pool_idx], len(classes), vf, tf, seed)
    chosen = {"train": pool_idx[tr]}
    chosen["val"] = pool_idx[va] if carve_val else splits["val"]
    if carve_test:
        chosen["test"] = pool_idx[te] if tf > 0 else None
    else:
        chosen["test"] = splits["test"]

    def take(idx):
        if idx is None:
            return None
        return TensorSplit(images[idx].contiguous(), labels[idx].contiguous())

    return ImageData(
        classes=list(classes),
        train=take(chosen["train"]),
        val=take(chosen["val"]),
        test=take(chosen["test"]),
        skipped_files=skipped,
        warnings=list(getattr(source, "warnings", ())),
    )
