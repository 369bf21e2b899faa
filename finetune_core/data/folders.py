"""Folders in ImageFolder layout: one subfolder per class, optionally under train/, val/
and test/; indexed without decoding, decoded once through the cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune_core.data import cache
from finetune_core.data.base import SAMPLES_PER_CLASS, DataError, DataInfo
from finetune_core.data.decode import decode_files, resample, unreadable

_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}


@dataclass
class FolderIndex:
    root: Path
    classes: list[str]
    files: dict[str, list[tuple[Path, int]]]  # split or "all" -> [(file, class index)]
    has_splits: bool
    label: str  # how to name the data in messages


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name.lower() not in _IGNORED_FILES


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


def _files_under(folder: Path) -> list[Path]:
    """Returns every visible file below folder (recursively, links followed), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower() not in _IGNORED_FILES:
                out.append(Path(dirpath) / f)
    return out


def _class_folders(folder: Path, label: str) -> dict[str, list[Path]]:
    dirs = _subdirs(folder)
    if not dirs:
        has_files = any(p.is_file() and _visible(p) for p in folder.iterdir())
        what = "image files but no class subfolders" if has_files else "no class subfolders"
        raise DataError(
            f"{label} has {what}: put the images of each class in its own subfolder "
            f"({label}/cat/1.jpg, {label}/dog/2.jpg, ...), optionally under train/ and val/."
        )
    return {d.name: _files_under(d) for d in dirs}


def index_folder(root: Path, label: str) -> FolderIndex:
    subdirs = _subdirs(root)
    named = {}
    for d in subdirs:
        split = _SPLIT_DIRS.get(d.name.lower())
        if split is None:
            continue
        if split in named:
            raise DataError(
                f"{label} has both {named[split].name}/ and {d.name}/ as the {split} split; "
                f"keep one of them."
            )
        named[split] = d
    if "train" in named and len(named) == len(subdirs):
        per_split = {s: _class_folders(d, f"{label}/{d.name}") for s, d in named.items()}
        classes = sorted(set().union(*per_split.values()))
        for c in classes:
            if not per_split["train"].get(c):
                raise DataError(
                    f"class {c!r} has no training images: {label}/{named['train'].name}/{c} is "
                    f"missing or empty. Add images there or remove the class from every split."
                )
        for s, per_class in per_split.items():
            if not any(per_class.values()):
                raise DataError(
                    f"{label}/{named[s].name} holds no images; add images or remove the folder."
                )
        files = {
            s: [(p, classes.index(c)) for c in sorted(pc) for p in pc[c]]
            for s, pc in per_split.items()
        }
        index = FolderIndex(root, classes, files, "val" in named, label)
    else:
        per_class = _class_folders(root, label)
        classes = sorted(per_class)
        for c in classes:
            if not per_class[c]:
                raise DataError(
                    f"class {c!r} is empty: {label}/{c} holds no files. Add images or remove "
                    f"the folder."
                )
        files = {"all": [(p, i) for i, c in enumerate(classes) for p in per_class[c]]}
        index = FolderIndex(root, classes, files, False, label)
    if len(index.classes) == 1:
        name = index.classes[0]
        raise DataError(
            f"only 1 class ({name}) found; a classifier needs at least 2: {label} has fewer "
            f"than two classes ({name!r}). Put the images of each class in a subfolder of "
            f"its own, beside {name}."
        )
    if not index.classes:
        raise DataError(f"{label} has fewer than two classes: no class subfolder was found.")
    return index


def dataset_root(folder: Path) -> Path:
    """Returns the folder that holds the classes: a zip often wraps them in one top folder.

    A lone folder that holds subfolders is such a wrapper; a lone folder of image files is a
    class (a zip of one class)."""
    while True:
        entries = [p for p in folder.iterdir() if _visible(p)]
        dirs = [p for p in entries if p.is_dir()]
        if (
            len(dirs) == 1
            and len(entries) == 1
            and _SPLIT_DIRS.get(dirs[0].name.lower()) is None
            and _subdirs(dirs[0])
        ):
            folder = dirs[0]
        else:
            return folder


def decode_folder(index: FolderIndex, size: int, interpolation: str, progress):
    """Returns (images, labels, split tags, skipped relative paths) for every file of index."""
    items = [(split, p, y) for split, files in index.files.items() for p, y in files]
    paths = [p for _, p, _ in items]
    stats = []
    for p in paths:
        try:
            st = p.stat()
            stats.append([str(p.relative_to(index.root)), st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append([str(p), -1, -1])
    key = [str(index.root.resolve()), size, resample(interpolation).name, stats]
    key.append([[s, y] for s, _, y in items])
    entry = cache.path_for(key)
    blob = cache.load(entry)
    if blob is None:
        images, bad = decode_files(paths, size, resample(interpolation), progress)
        blob = {"images": images, "bad": torch.tensor(bad, dtype=torch.int64)}
        cache.store(entry, blob)
    elif progress is not None:
        progress("data", 1.0, f"loaded {len(paths)} decoded images from the cache")
    bad_set = set(blob["bad"].tolist())
    keep = torch.tensor([i not in bad_set for i in range(len(items))], dtype=torch.bool)
    labels = torch.tensor([y for _, _, y in items], dtype=torch.int64)
    tags = [s for s, _, _ in items]
    skipped = [Path(stats[i][0]).as_posix() for i in sorted(bad_set)]
    return blob["images"], labels, tags, keep, skipped


def inspect_folder(spec: str, index: FolderIndex) -> DataInfo:
    """Returns the classes, file counts per split and a few sample paths of an indexed folder."""
    counts: dict[str, dict[str, int]] = {}
    samples: dict[str, list[str]] = {c: [] for c in index.classes}
    for split, files in index.files.items():
        n = [0] * len(index.classes)
        for p, y in files:
            n[y] += 1
            if len(samples[index.classes[y]]) < SAMPLES_PER_CLASS:
                samples[index.classes[y]].append(str(p))
        counts[split] = dict(zip(index.classes, n, strict=True))
    return DataInfo(spec, list(index.classes), counts, index.has_splits, samples)


@dataclass
class FolderSource:
    """A folder, an extracted zip or a generated built-in dataset as a data source."""

    spec: str
    index: FolderIndex

    @property
    def label(self) -> str:
        return self.index.label

    def inspect(self) -> DataInfo:
        return inspect_folder(self.spec, self.index)

    def decode(self, size: int, interpolation: str, progress):
        """Returns (classes, images, labels, split tags, keep mask, skipped files)."""
        return (self.index.classes, *decode_folder(self.index, size, interpolation, progress))

    def unreadable(self) -> list[str]:
        """Returns the files that are not readable images, relative to the data's folder."""
        paths = [p for files in self.index.files.values() for p, _ in files]
        return [paths[i].relative_to(self.index.root).as_posix() for i in unreadable(paths)]
