"""Folders in ImageFolder layout: one subfolder per class, optionally under train/, val/
and test/; indexed without decoding, decoded once through the cache."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune_core.data import cache
from finetune_core.data.base import SAMPLES_PER_CLASS, DataError, DataInfo, env_limit
from finetune_core.data.decode import decode_files, resample, unreadable

_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}
_IGNORED_DIRS = {"__macosx"}  # macOS's resource forks in zips made by Finder
# Kernel views of the system, not data: walking them reads endless or changing "files".
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")
# A walk lists at most this many entries (files, folders, links; FINETUNE_FOLDER_MAX_FILES)
# in one data folder: more than the decoded images fit in memory at any useful size, and
# a bound on the time a mistaken folder (a home folder, /usr) costs before it is refused.
FOLDER_MAX_FILES = 500_000
FOLDER_MAX_DEPTH = 32  # folder levels below a class folder


@dataclass
class FolderIndex:
    root: Path
    classes: list[str]
    files: dict[str, list[tuple[Path, int]]]  # split or "all" -> [(file, class index)]
    has_splits: bool
    label: str  # how to name the data in messages
    warnings: list[str] = field(default_factory=list)  # DataInfo.warnings


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name.lower() not in _IGNORED_FILES


def _visible_dir(name: str) -> bool:
    return not name.startswith(".") and name.lower() not in _IGNORED_DIRS


def refuse_system_path(path: Path, label: str) -> None:
    """Raises DataError when path is the file system's root or lies in /proc, /sys or /dev
    (links resolved): those hold no dataset, and walking them never ends."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return  # the caller's own checks say what is wrong with it
    if real == os.path.sep:
        raise DataError(
            f"{label} is the root of the file system, not a dataset folder; give the folder "
            f"that holds one subfolder per class."
        )
    for system in SYSTEM_FOLDERS:
        if real == system or real.startswith(system + os.path.sep):
            raise DataError(
                f"{label} is in {system}, a folder of the system, not of data ({real}); give "
                f"the folder that holds one subfolder per class."
            )


class _Walk:
    """Counts what a folder walk lists, so that no folder costs more than the limit."""

    def __init__(self, label: str):
        self.label = label
        self.limit = env_limit("FINETUNE_FOLDER_MAX_FILES", FOLDER_MAX_FILES)
        self.seen = 0
        self.links: list[str] = []  # links to folders, not followed
        self.special: list[str] = []  # pipes, devices, sockets, broken links: not read

    def scan(self, folder: Path) -> list[os.DirEntry]:
        """Returns folder's entries sorted by name; DataError when unreadable or too many."""
        try:
            with os.scandir(folder) as it:
                entries = []
                for e in it:
                    self.seen += 1
                    if self.seen > self.limit:
                        raise DataError(
                            f"{self.label} holds more than {self.limit:,} files and folders, the "
                            f"most one data folder may hold here (FINETUNE_FOLDER_MAX_FILES): is "
                            f"it the right folder? Give the folder of the dataset itself."
                        )
                    entries.append(e)
        except OSError as e:
            raise DataError(
                f"{folder} could not be read ({e.strerror or e}); check that it exists and "
                f"that this server may read it."
            ) from e
        return sorted(entries, key=lambda e: e.name)

    def subdirs(self, folder: Path) -> list[Path]:
        """Returns folder's visible subfolders; a link to a folder counts (one hop: a class
        folder may be a link to the images), a link into a system folder is refused."""
        out = []
        for e in self.scan(folder):
            if _visible_dir(e.name) and _is_dir(e, follow=True):
                if e.is_symlink():
                    refuse_system_path(Path(e.path), f"{folder / e.name} (a link)")
                out.append(Path(e.path))
        return out

    def has_files(self, folder: Path) -> bool:
        return any(_visible(Path(e.path)) and _is_file(e) for e in self.scan(folder))

    def files_under(self, folder: Path) -> list[Path]:
        """Returns every visible regular file below folder (links to files followed, links to
        folders not), in os.walk's top-down order with names sorted."""
        out: list[Path] = []
        stack = [(folder, 0)]
        while stack:
            here, depth = stack.pop()
            subdirs = []
            for e in self.scan(here):
                if _is_dir(e, follow=False):
                    if _visible_dir(e.name):
                        subdirs.append(Path(e.path))
                elif not _visible(Path(e.name)):
                    continue
                elif _is_dir(e, follow=True):
                    self.links.append(e.path)
                elif _is_file(e):
                    out.append(Path(e.path))
                else:
                    self.special.append(e.path)
            if subdirs and depth >= FOLDER_MAX_DEPTH:
                raise DataError(
                    f"{subdirs[0]} is more than {FOLDER_MAX_DEPTH} folders below {folder}, "
                    f"deeper than a class folder may go; flatten the class folder."
                )
            stack.extend((d, depth + 1) for d in reversed(subdirs))
        return out

    def warnings(self) -> list[str]:
        out = []
        for paths, what in (
            (self.links, "links to folders, which are not followed"),
            (self.special, "entries that are not regular files (pipes, devices, broken links)"),
        ):
            if paths:
                shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
                out.append(f"{self.label}: {len(paths)} {what}, were left out: {shown}")
        return out


def _is_dir(e: os.DirEntry, *, follow: bool) -> bool:
    try:
        return e.is_dir(follow_symlinks=follow)
    except OSError:
        return False


def _is_file(e: os.DirEntry) -> bool:
    try:
        return e.is_file()  # follows a link: a link to a regular file is that file
    except OSError:
        return False


def _class_folders(walk: _Walk, folder: Path, label: str) -> dict[str, list[Path]]:
    dirs = walk.subdirs(folder)
    if not dirs:
        has_files = walk.has_files(folder)
        what = "image files but no class subfolders" if has_files else "no class subfolders"
        raise DataError(
            f"{label} has {what}: put the images of each class in its own subfolder "
            f"({label}/cat/1.jpg, {label}/dog/2.jpg, ...), optionally under train/ and val/."
        )
    return {d.name: walk.files_under(d) for d in dirs}


def _split_folders(subdirs: list[Path], label: str) -> dict[str, Path]:
    """Returns {split: folder} for train/, val/, test/ (and their other names) among subdirs;
    DataError when they stand beside other folders (classes or not? ambiguous) or lack train/."""
    named: dict[str, Path] = {}
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
    if not named:
        return named
    given = ", ".join(f"{d.name}/" for d in named.values())
    stray = [d.name for d in subdirs if _SPLIT_DIRS.get(d.name.lower()) is None]
    if stray:
        shown = ", ".join(f"{n}/" for n in stray[:5]) + (", ..." if len(stray) > 5 else "")
        raise DataError(
            f"{label} holds {given} and also {shown}: beside split folders every other folder "
            f"is ambiguous (a class, or not data?). Move {shown} out of {label}, or into "
            f"{named.get('train', next(iter(named.values()))).name}/ if it is a class."
        )
    if "train" not in named:
        raise DataError(
            f"{label} holds {given} but no train/ folder; add train/ with one subfolder per "
            f"class, or, if these are classes, rename them."
        )
    return named


def index_folder(root: Path, label: str) -> FolderIndex:
    refuse_system_path(root, label)
    walk = _Walk(label)
    subdirs = walk.subdirs(root)
    named = _split_folders(subdirs, label)
    warnings: list[str] = []
    if named:
        per_split = {s: _class_folders(walk, d, f"{label}/{d.name}") for s, d in named.items()}
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
            missing = [c for c in classes if not per_class.get(c)]
            if missing:
                shown = ", ".join(repr(c) for c in missing[:5]) + (
                    ", ..." if len(missing) > 5 else ""
                )
                warnings.append(
                    f"{label}/{named[s].name}/ has no images of {len(missing)} class"
                    f"{'es' if len(missing) > 1 else ''} that train/ has ({shown}): their "
                    f"{s} accuracy cannot be measured. Add images there to measure it."
                )
        files = {
            s: [(p, classes.index(c)) for c in sorted(pc) for p in pc[c]]
            for s, pc in per_split.items()
        }
        index = FolderIndex(root, classes, files, "val" in named, label)
    else:
        per_class = _class_folders(walk, root, label)
        classes = sorted(per_class)
        for c in classes:
            if not per_class[c]:
                raise DataError(
                    f"class {c!r} is empty: {label}/{c} holds no files. Add images or remove "
                    f"the folder."
                )
        files = {"all": [(p, i) for i, c in enumerate(classes) for p in per_class[c]]}
        index = FolderIndex(root, classes, files, False, label)
    index.warnings = warnings + walk.warnings()
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
    class (a zip of one class). Links are not followed."""
    walk = _Walk(str(folder))
    for _ in range(FOLDER_MAX_DEPTH):
        entries = [e for e in walk.scan(folder) if _visible(Path(e.name))]
        entries = [e for e in entries if _visible_dir(e.name) or not _is_dir(e, follow=False)]
        dirs = [Path(e.path) for e in entries if _is_dir(e, follow=False)]
        if not (
            len(dirs) == 1
            and len(entries) == 1
            and _SPLIT_DIRS.get(dirs[0].name.lower()) is None
            and any(_is_dir(e, follow=False) and _visible_dir(e.name) for e in walk.scan(dirs[0]))
        ):
            break
        folder = dirs[0]
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
    return DataInfo(
        spec, list(index.classes), counts, index.has_splits, samples, warnings=list(index.warnings)
    )


@dataclass
class FolderSource:
    """A folder, an extracted zip or a generated built-in dataset as a data source."""

    spec: str
    index: FolderIndex

    @property
    def label(self) -> str:
        return self.index.label

    @property
    def warnings(self) -> list[str]:
        return list(self.index.warnings)

    def inspect(self) -> DataInfo:
        return inspect_folder(self.spec, self.index)

    def decode(self, size: int, interpolation: str, progress):
        """Returns (classes, images, labels, split tags, keep mask, skipped files)."""
        return (self.index.classes, *decode_folder(self.index, size, interpolation, progress))

    def unreadable(self) -> list[str]:
        """Returns the files that are not readable images, relative to the data's folder."""
        paths = [p for files in self.index.files.values() for p, _ in files]
        return [paths[i].relative_to(self.index.root).as_posix() for i in unreadable(paths)]
