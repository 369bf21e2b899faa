"""Dataset sources, splits, decode-once tensor datasets, tensor augmentation, safe zip import.

A data spec is one of: a folder in ImageFolder layout (class subfolders, optionally under
train/, val/ and test/), a `.zip` of such a folder, `builtin:shapes` / `builtin:shapes-source`
(generated PNG folders, see shapes.py), or `torchvision:NAME`.

Every image is decoded once with PIL, converted to RGB, resized (shorter side to the image
size, then a centre crop) and kept as uint8 [N, 3, S, S]. Training then only indexes
tensors and augments whole batches on tensors, so the input pipeline costs a small
fraction of a training step. Decoded tensors are cached on disk, keyed by the files'
names, sizes and modification times, so a second run on the same data starts at once.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import shutil
import stat
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from finetune_core import shapes


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


BUILTIN = tuple(shapes.DATASETS)  # builtin:NAME choices
SAMPLES_PER_CLASS = 8  # file paths per class in DataInfo.samples (the UI's sample grid)
ZIP_MAX_BYTES = 16 * 2**30  # uncompressed size above which a zip is refused (zip bomb)
ZIP_MAX_FILES = 2_000_000
DECODED_CACHE_MAX_BYTES = 4 * 2**30  # the decoded-tensor cache keeps at most this much
_CACHE_FORMAT = 1  # bump when the decoding changes, so old cache entries are not used

_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}
_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_SPEC_FORMS = (
    "a folder with one subfolder per class (optionally under train/, val/, test/), "
    "a .zip of such a folder, builtin:shapes, builtin:shapes-source, or torchvision:NAME "
    "(NAME one of {names})"
)


def data_dir() -> Path:
    """Returns the folder for generated built-in data and torchvision downloads."""
    env = os.environ.get("FINETUNE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "finetune_dashboard" / "data"


def class_counts(split: TensorSplit, num_classes: int) -> torch.Tensor:
    """Returns the number of images of each class in split, int64 [num_classes]."""
    return torch.bincount(split.labels.cpu(), minlength=num_classes)[:num_classes]


# ---------------------------------------------------------------------------------------------
# torchvision datasets


@dataclass(frozen=True)
class _TorchvisionSet:
    cls: str  # class name in torchvision.datasets
    splits: dict  # our split ("train" | "val" | "test" | "all") -> constructor kwargs
    sizes: dict  # our split -> number of images (for DataInfo before the download)
    folder: str  # where the files go under data_dir()/torchvision
    classes: tuple[str, ...] | None = None  # None: the torchvision class attribute has them


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_CIFAR100 = _words(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house "
    "kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle "
    "mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew "
    "skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
    "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf "
    "woman worm"
)
_FOOD101 = _words(
    "apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap "
    "bread_pudding breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake "
    "ceviche cheese_plate cheesecake chicken_curry chicken_quesadilla chicken_wings "
    "chocolate_cake chocolate_mousse churros clam_chowder club_sandwich crab_cakes creme_brulee "
    "croque_madame cup_cakes deviled_eggs donuts dumplings edamame eggs_benedict escargots "
    "falafel filet_mignon fish_and_chips foie_gras french_fries french_onion_soup french_toast "
    "fried_calamari fried_rice frozen_yogurt garlic_bread gnocchi greek_salad "
    "grilled_cheese_sandwich grilled_salmon guacamole gyoza hamburger hot_and_sour_soup hot_dog "
    "huevos_rancheros hummus ice_cream lasagna lobster_bisque lobster_roll_sandwich "
    "macaroni_and_cheese macarons miso_soup mussels nachos omelette onion_rings oysters pad_thai "
    "paella pancakes panna_cotta peking_duck pho pizza pork_chop poutine prime_rib "
    "pulled_pork_sandwich ramen ravioli red_velvet_cake risotto samosa sashimi scallops "
    "seaweed_salad shrimp_and_grits spaghetti_bolognese spaghetti_carbonara spring_rolls steak "
    "strawberry_shortcake sushi tacos takoyaki tiramisu tuna_tartare waffles"
)
_DTD = _words(
    "banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline "
    "dotted fibrous flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted "
    "lacelike lined marbled matted meshed paisley perforated pitted pleated polka-dotted porous "
    "potholed scaly smeared spiralled sprinkled stained stratified striped studded swirly veined "
    "waffled woven wrinkled zigzagged"
)
_PETS = tuple(
    s.strip()
    for s in (
        "Abyssinian, American Bulldog, American Pit Bull Terrier, Basset Hound, Beagle, Bengal, "
        "Birman, Bombay, Boxer, British Shorthair, Chihuahua, Egyptian Mau, English Cocker "
        "Spaniel, English Setter, German Shorthaired, Great Pyrenees, Havanese, Japanese Chin, "
        "Keeshond, Leonberger, Maine Coon, Miniature Pinscher, Newfoundland, Persian, "
        "Pomeranian, Pug, Ragdoll, Russian Blue, Saint Bernard, Samoyed, Scottish Terrier, "
        "Shiba Inu, Siamese, Sphynx, Staffordshire Bull Terrier, Wheaten Terrier, "
        "Yorkshire Terrier"
    ).split(",")
)

TORCHVISION = {
    "CIFAR10": _TorchvisionSet(
        "CIFAR10",
        {"train": {"train": True}, "test": {"train": False}},
        {"train": 50000, "test": 10000},
        "cifar-10-batches-py/",
        _words("airplane automobile bird cat deer dog frog horse ship truck"),
    ),
    "CIFAR100": _TorchvisionSet(
        "CIFAR100",
        {"train": {"train": True}, "test": {"train": False}},
        {"train": 50000, "test": 10000},
        "cifar-100-python/",
        _CIFAR100,
    ),
    "MNIST": _TorchvisionSet(
        "MNIST",
        {"train": {"train": True}, "test": {"train": False}},
        {"train": 60000, "test": 10000},
        "MNIST/raw/",
    ),
    "FashionMNIST": _TorchvisionSet(
        "FashionMNIST",
        {"train": {"train": True}, "test": {"train": False}},
        {"train": 60000, "test": 10000},
        "FashionMNIST/raw/",
    ),
    "Flowers102": _TorchvisionSet(
        "Flowers102",
        {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
        {"train": 1020, "val": 1020, "test": 6149},
        "flowers-102/",
    ),
    "OxfordIIITPet": _TorchvisionSet(
        "OxfordIIITPet",
        {"train": {"split": "trainval"}, "test": {"split": "test"}},
        {"train": 3680, "test": 3669},
        "oxford-iiit-pet/",
        _PETS,
    ),
    "Food101": _TorchvisionSet(
        "Food101",
        {"train": {"split": "train"}, "test": {"split": "test"}},
        {"train": 75750, "test": 25250},
        "food-101/",
        _FOOD101,
    ),
    "EuroSAT": _TorchvisionSet(
        "EuroSAT",
        {"all": {}},
        {"all": 27000},
        "eurosat/2750/",
        _words(
            "AnnualCrop Forest HerbaceousVegetation Highway Industrial Pasture PermanentCrop "
            "Residential River SeaLake"
        ),
    ),
    "DTD": _TorchvisionSet(
        "DTD",
        {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
        {"train": 1880, "val": 1880, "test": 1880},
        "dtd/dtd/",
        _DTD,
    ),
    "STL10": _TorchvisionSet(
        "STL10",
        {"train": {"split": "train"}, "test": {"split": "test"}},
        {"train": 5000, "test": 8000},
        "stl10_binary/",
        _words("airplane bird car cat deer dog horse monkey ship truck"),
    ),
}


def _tv_classes(entry: _TorchvisionSet) -> list[str]:
    if entry.classes is not None:
        return list(entry.classes)
    import torchvision.datasets as tvd

    return list(getattr(tvd, entry.cls).classes)


def _tv_root() -> Path:
    return data_dir() / "torchvision"


def _tv_entry(name: str) -> _TorchvisionSet:
    by_lower = {k.lower(): k for k in TORCHVISION}
    key = by_lower.get(name.lower())
    if key is None:
        close = difflib.get_close_matches(name, list(TORCHVISION), n=1, cutoff=0.5)
        hint = f" Did you mean torchvision:{close[0]}?" if close else ""
        raise DataError(
            f"unknown torchvision dataset {name!r}; choose one of {', '.join(TORCHVISION)}.{hint}"
        )
    return TORCHVISION[key]


def _tv_open(entry: _TorchvisionSet, split: str, *, download: bool):
    import torchvision.datasets as tvd

    return getattr(tvd, entry.cls)(str(_tv_root()), download=download, **entry.splits[split])


def _tv_downloaded(entry: _TorchvisionSet) -> bool:
    if not (_tv_root() / entry.folder).exists():  # cheap: no torchvision import
        return False
    try:
        for split in entry.splits:
            _tv_open(entry, split, download=False)
    except (RuntimeError, OSError, FileNotFoundError):
        return False
    return True


def _tv_labels_and_files(ds) -> tuple[list[int], list[Path] | None]:
    """Returns the labels of a torchvision dataset and its image files (None when in arrays)."""
    if hasattr(ds, "samples"):  # ImageFolder-based (EuroSAT)
        return [int(y) for _, y in ds.samples], [Path(p) for p, _ in ds.samples]
    for files_attr in ("_image_files", "_images"):
        if hasattr(ds, files_attr) and hasattr(ds, "_labels"):
            return [int(y) for y in ds._labels], [Path(p) for p in getattr(ds, files_attr)]
    for labels_attr in ("targets", "labels"):
        if getattr(ds, labels_attr, None) is not None:
            return [int(y) for y in getattr(ds, labels_attr)], None
    return [int(ds[i][1]) for i in range(len(ds))], None


def _tv_download_error(entry: _TorchvisionSet, name: str, err: Exception) -> DataError:
    root = _tv_root()
    return DataError(
        f"could not download torchvision:{name} into {root} "
        f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}). "
        f"Connect to the network and try again, or put the dataset's files there yourself "
        f"(torchvision.datasets.{entry.cls} expects {root / entry.folder}), "
        f"or choose other data: a folder of images, a .zip, or builtin:shapes (no download)."
    )


def _inspect_torchvision(spec: str, entry: _TorchvisionSet) -> DataInfo:
    classes = _tv_classes(entry)
    if not _tv_downloaded(entry):
        # Before the download: the published split sizes, spread evenly over the classes.
        counts = {
            split: {c: n // len(classes) for c in classes} for split, n in entry.sizes.items()
        }
        return DataInfo(spec, classes, counts, "val" in entry.sizes, {}, needs_download=True)
    counts, samples = {}, {}
    for split in entry.splits:
        ds = _tv_open(entry, split, download=False)
        labels, files = _tv_labels_and_files(ds)
        classes = list(getattr(ds, "classes", None) or classes)
        n = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
        counts[split] = {c: int(n[i]) for i, c in enumerate(classes)}
        if files is not None and not samples:
            for y, p in zip(labels, files, strict=True):
                lst = samples.setdefault(classes[y], [])
                if len(lst) < SAMPLES_PER_CLASS:
                    lst.append(str(p))
    return DataInfo(spec, classes, counts, "val" in entry.splits, samples)


# ---------------------------------------------------------------------------------------------
# folders and zips


@dataclass
class _FolderIndex:
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
            f"({folder}/cat/1.jpg, {folder}/dog/2.jpg, ...), optionally under train/ and val/."
        )
    return {d.name: _files_under(d) for d in dirs}


def _index_folder(root: Path, label: str) -> _FolderIndex:
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
                    f"class {c!r} has no training images: {named['train'] / c} is missing or "
                    f"empty. Add images there or remove the class from every split."
                )
        for s, per_class in per_split.items():
            if not any(per_class.values()):
                raise DataError(f"{named[s]} holds no images; add images or remove the folder.")
        files = {
            s: [(p, classes.index(c)) for c in sorted(pc) for p in pc[c]]
            for s, pc in per_split.items()
        }
        index = _FolderIndex(root, classes, files, "val" in named, label)
    else:
        per_class = _class_folders(root, label)
        classes = sorted(per_class)
        for c in classes:
            if not per_class[c]:
                raise DataError(
                    f"class {c!r} is empty: {root / c} holds no files. Add images or remove "
                    f"the folder."
                )
        files = {"all": [(p, i) for i, c in enumerate(classes) for p in per_class[c]]}
        index = _FolderIndex(root, classes, files, False, label)
    if len(index.classes) < 2:
        found = f" (only {index.classes[0]!r})" if index.classes else ""
        raise DataError(
            f"{label} has fewer than two classes{found}; a classifier needs at least two class "
            f"subfolders, one per class."
        )
    return index


def _zip_digest(path: Path) -> str:
    """Returns the zip's sha256, remembered by (path, size, mtime) so re-use costs no hashing."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = data_dir() / "zips" / "hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = digest
    _atomic_write_text(memo_file, json.dumps(memo))
    return digest


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _safe_member(info: zipfile.ZipInfo, zip_path: Path) -> str | None:
    """Returns the member's relative path to extract, None to skip it; DataError when unsafe."""
    name = info.filename.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or any(p == ".." for p in parts):
        raise DataError(
            f"{zip_path} is not safe to extract: member {info.filename!r} points outside the "
            f"folder (absolute path or '..'). Re-create the zip from the dataset folder."
        )
    mode = info.external_attr >> 16
    if mode and stat.S_ISLNK(mode):
        raise DataError(
            f"{zip_path} contains a symbolic link ({info.filename!r}), which is refused for "
            f"safety. Re-create the zip with the real files."
        )
    if info.flag_bits & 0x1:
        raise DataError(
            f"{zip_path} is password protected ({info.filename!r}); unzip it yourself and "
            f"give the folder instead."
        )
    if not parts or parts[0] == "__MACOSX":
        return None
    return "/".join(parts)


def _extract_zip(path: Path, label: str) -> Path:
    """Returns the folder the zip is extracted to (once; cached by the zip's sha256)."""
    digest = _zip_digest(path)
    zips = data_dir() / "zips"
    dest = zips / f"{digest[:20]}"
    if dest.is_dir():
        return dest
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{label} is not a readable zip file ({e}).") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > ZIP_MAX_FILES:
            raise DataError(f"{label} has {len(infos)} entries, more than {ZIP_MAX_FILES}.")
        members = [(info, _safe_member(info, path)) for info in infos]
        total = sum(info.file_size for info in infos)
        if total > ZIP_MAX_BYTES:
            raise DataError(
                f"{label} would unpack to {total / 2**30:.1f} GiB, more than the "
                f"{ZIP_MAX_BYTES / 2**30:.0f} GiB allowed (a zip bomb?). Unzip it yourself "
                f"and give the folder instead."
            )
        zips.mkdir(parents=True, exist_ok=True)
        tmp = zips / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for info, rel in members:
                if rel is None:
                    continue
                target = tmp / rel
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                # zipfile never yields more than the header's file_size, which `total` bounds.
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():
                    raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as e:
            raise DataError(f"{label} could not be extracted ({e}).") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _dataset_root(folder: Path) -> Path:
    """Returns the folder that holds the classes: a zip often wraps them in one top folder."""
    while True:
        entries = [p for p in folder.iterdir() if _visible(p)]
        dirs = [p for p in entries if p.is_dir()]
        if len(dirs) == 1 and len(entries) == 1 and _SPLIT_DIRS.get(dirs[0].name.lower()) is None:
            folder = dirs[0]
        else:
            return folder


def _resolve(spec: str, progress=None):
    """Returns ("torchvision", name) or ("folder", _FolderIndex) for a spec string."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("no data given; " + _spec_forms())
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if sep and kind == "builtin":
        if rest not in BUILTIN:
            raise DataError(
                f"unknown built-in dataset {rest!r}; choose "
                + " or ".join(f"builtin:{n}" for n in BUILTIN)
                + "."
            )
        if (
            progress is not None
            and not (data_dir() / "builtin" / shapes.folder_name(rest)).is_dir()
        ):
            progress("data", None, f"generating builtin:{rest} (first use, a few seconds)")
        root = shapes.ensure(rest, data_dir() / "builtin", progress=progress)
        return "folder", _index_folder(root, spec)
    if sep and kind == "torchvision":
        return "torchvision", _tv_entry(rest)
    path = Path(spec).expanduser()
    if not path.exists():
        if sep and len(kind) > 1 and kind.isidentifier():
            raise DataError(f"unknown data spec form {kind + ':'!r} in {spec!r}; " + _spec_forms())
        raise DataError(f"data path {path} does not exist; give " + _spec_forms())
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(
                f"{path} is a file but not a .zip; give a folder with one subfolder per class, "
                f"or a .zip of such a folder."
            )
        label = f"{path} (extracted)"
        return "folder", _index_folder(_dataset_root(_extract_zip(path, str(path))), label)
    return "folder", _index_folder(path, str(path))


def _spec_forms() -> str:
    return _SPEC_FORMS.format(names=", ".join(TORCHVISION)) + "."


def inspect_data(spec: str) -> DataInfo:
    """Returns DataInfo for a spec; raises DataError when it does not exist or is unusable.

    Decodes nothing and downloads nothing (needs_download says a torchvision dataset is not
    there yet). It does extract a .zip and generate a built-in dataset into the data folder
    the first time, since both are caches that the run needs anyway.
    """
    kind, src = _resolve(spec)
    if kind == "torchvision":
        return _inspect_torchvision(spec, src)
    counts: dict[str, dict[str, int]] = {}
    samples: dict[str, list[str]] = {c: [] for c in src.classes}
    for split, files in src.files.items():
        n = [0] * len(src.classes)
        for p, y in files:
            n[y] += 1
            if len(samples[src.classes[y]]) < SAMPLES_PER_CLASS:
                samples[src.classes[y]].append(str(p))
        counts[split] = dict(zip(src.classes, n, strict=True))
    return DataInfo(spec, list(src.classes), counts, src.has_splits, samples)


# ---------------------------------------------------------------------------------------------
# splits


def _portion(n: int, fraction: float) -> int:
    """Returns how many of n images a split of `fraction` gets: rounded, at least one."""
    if fraction <= 0:
        return 0
    return max(1, int(n * fraction + 0.5))


def _carve(counts: dict[str, dict[str, int]]) -> tuple[str, bool, bool]:
    """Returns (pool split, carve val?, carve test?) for the splits the data gives."""
    if "all" in counts:
        return "all", True, True
    return "train", "val" not in counts, "test" not in counts


def check_split(info: DataInfo, val_fraction: float, test_fraction: float) -> str | None:
    """Returns a message when a class has too few images for the split, else None."""
    pool, carve_val, carve_test = _carve(info.counts)
    vf = val_fraction if carve_val else 0.0
    tf = test_fraction if carve_test else 0.0
    if carve_val and val_fraction <= 0:
        return (
            "the data has no val/ folder, so --val-fraction must be above 0 "
            "(0.2 keeps a fifth of each class for validation)."
        )
    if vf + tf >= 1:
        return f"--val-fraction {vf} plus --test-fraction {tf} leaves nothing to train on."
    need = 1 + (vf > 0) + (tf > 0)
    parts = ["1 train"] + (["1 val"] if vf > 0 else []) + (["1 test"] if tf > 0 else [])
    for c in info.classes:
        n = info.counts[pool].get(c, 0)
        if n - _portion(n, vf) - _portion(n, tf) < 1:
            where = "" if pool == "all" else f" in {pool}/"
            return (
                f"class {c!r} has {n} image{'s' if n != 1 else ''}{where}; this split "
                f"(val fraction {vf:g}, test fraction {tf:g}) needs at least {need} per class "
                f"({', '.join(parts)}). Add images to that class, or lower --val-fraction / "
                f"--test-fraction."
            )
    return None


def _split_indices(
    labels: torch.Tensor, num_classes: int, vf: float, tf: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns stratified (train, val, test) index tensors into labels, seeded."""
    g = torch.Generator().manual_seed(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test, n_val = _portion(len(idx), tf), _portion(len(idx), vf)
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test : n_test + n_val])
        parts[0].append(idx[n_test + n_val :])
    return tuple(torch.sort(torch.cat(p)).values for p in parts)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# decoding


def _resample(interpolation) -> Image.Resampling:
    name = str(getattr(interpolation, "value", interpolation)).lower().rpartition(".")[2]
    if name not in _INTERPOLATIONS:
        raise DataError(
            f"unknown interpolation {interpolation!r}; choose one of {', '.join(_INTERPOLATIONS)}."
        )
    return _INTERPOLATIONS[name]


def _to_rgb(im: Image.Image) -> Image.Image:
    """Returns im as 8-bit RGB; transparency is composited onto white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255 if im.mode != "F" or a.max() > 1 else a * 255, 0, 255)
        return Image.fromarray(np.rint(a).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(path: Path, size: int, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    """Returns the image at path as uint8 [size, size, 3]: RGB, shorter side resized, centre crop.

    Raises whatever PIL raises for unreadable, truncated or non-image files.
    """
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size
        im.load()
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block: keep the pixels as stored
            pass
        im = _to_rgb(im)
        w, h = im.size
        if (w, h) != (size, size):
            m = min(w, h)
            box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)
            im = im.resize((size, size), resample, box=box)
        return np.array(im, dtype=np.uint8)  # a writable copy for torch.from_numpy


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def _decode_files(paths: list[Path], size: int, resample, progress) -> tuple[torch.Tensor, list]:
    """Returns (uint8 [N,3,S,S] images, list of indices that could not be decoded)."""
    n = len(paths)
    out = torch.zeros((n, 3, size, size), dtype=torch.uint8)
    bad: list[int] = []
    lock = threading.Lock()

    def work(start: int, stop: int) -> int:
        for i in range(start, stop):
            try:
                arr = decode_image(paths[i], size, resample)
            except Exception:  # unreadable, truncated or not an image: skipped and listed
                with lock:
                    bad.append(i)
                continue
            out[i].copy_(torch.from_numpy(arr).permute(2, 0, 1))
        return stop - start

    chunk = 32
    done, last = 0, 0.0
    with ThreadPoolExecutor(_workers()) as ex:
        futures = [ex.submit(work, s, min(s + chunk, n)) for s in range(0, n, chunk)]
        for fut in as_completed(futures):
            done += fut.result()
            if progress is not None and (time.monotonic() - last > 0.25 or done == n):
                last = time.monotonic()
                progress("data", done / max(n, 1), f"decoding images {done}/{n}")
    return out, sorted(bad)


def _resize_tensor_images(images: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """Returns uint8 [N,3,H,W] images resized (shorter side) and centre-cropped to size."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    mode = InterpolationMode(_resample(interpolation).name.lower())
    out = []
    for i in range(0, len(images), 2048):
        b = images[i : i + 2048]
        if b.shape[-2:] != (size, size):
            b = TF.resize(b, [size], interpolation=mode, antialias=True)
            b = TF.center_crop(b, [size, size])
        out.append(b.contiguous())
    return torch.cat(out) if out else images.new_zeros((0, 3, size, size))


# ---------------------------------------------------------------------------------------------
# decoded-tensor cache


def _cache_path(key_parts) -> Path:
    key = hashlib.sha256(json.dumps([_CACHE_FORMAT, key_parts]).encode()).hexdigest()[:24]
    return data_dir() / "decoded" / f"{key}.pt"


def _cache_load(path: Path) -> dict | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        os.utime(path)  # most recently used: pruned last
        return blob
    except Exception:  # missing, torn or from another version: decode again
        return None


def _cache_store(path: Path, blob: dict) -> None:
    nbytes = blob["images"].numel()
    if nbytes > DECODED_CACHE_MAX_BYTES // 2:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        torch.save(blob, tmp)
        os.replace(tmp, path)
        entries = sorted(path.parent.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for p in entries:
            total += p.stat().st_size
            if total > DECODED_CACHE_MAX_BYTES and p != path:
                p.unlink(missing_ok=True)
    except OSError:  # a full or read-only disk only costs the next run its head start
        pass


def _decode_folder(index: _FolderIndex, size: int, interpolation: str, progress):
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
    key = [str(index.root.resolve()), size, _resample(interpolation).name, stats]
    key.append([[s, y] for s, _, y in items])
    cache = _cache_path(key)
    blob = _cache_load(cache)
    if blob is None:
        images, bad = _decode_files(paths, size, _resample(interpolation), progress)
        blob = {"images": images, "bad": torch.tensor(bad, dtype=torch.int64)}
        _cache_store(cache, blob)
    elif progress is not None:
        progress("data", 1.0, f"loaded {len(paths)} decoded images from the cache")
    bad_set = set(blob["bad"].tolist())
    keep = torch.tensor([i not in bad_set for i in range(len(items))], dtype=torch.bool)
    labels = torch.tensor([y for _, _, y in items], dtype=torch.int64)
    tags = [s for s, _, _ in items]
    skipped = [Path(stats[i][0]).as_posix() for i in sorted(bad_set)]
    return blob["images"], labels, tags, keep, skipped


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _decode_torchvision(entry: _TorchvisionSet, name: str, size, interpolation, progress):
    root = _tv_root()
    if not _tv_downloaded(entry):
        if progress is not None:
            progress("data", None, f"downloading torchvision:{name} into {root}")
        root.mkdir(parents=True, exist_ok=True)
        try:
            for split in entry.splits:
                _tv_open(entry, split, download=True)
        except Exception as e:  # URLError, HTTPError, checksum mismatch, ...
            raise _tv_download_error(entry, name, e) from e
    all_images, all_labels, tags, classes, skipped = [], [], [], None, []
    for split in entry.splits:
        ds = _tv_open(entry, split, download=False)
        classes = list(getattr(ds, "classes", None) or _tv_classes(entry))
        labels, files = _tv_labels_and_files(ds)
        key = ["torchvision", entry.cls, split, len(labels), size, _resample(interpolation).name]
        cache = _cache_path(key)
        blob = _cache_load(cache)
        if blob is None:
            if files is not None:
                images, bad = _decode_files(files, size, _resample(interpolation), progress)
            else:
                raw = ds.data
                raw = torch.as_tensor(np.asarray(raw))
                if raw.ndim == 3:  # MNIST-like: [N, H, W] grey
                    raw = raw[:, None].expand(-1, 3, -1, -1)
                elif raw.shape[-1] == 3:  # CIFAR: [N, H, W, 3]
                    raw = raw.permute(0, 3, 1, 2)
                if progress is not None:
                    progress("data", None, f"resizing {len(raw)} torchvision:{name} images")
                images, bad = _resize_tensor_images(raw, size, interpolation), []
            blob = {"images": images, "bad": torch.tensor(bad, dtype=torch.int64)}
            _cache_store(cache, blob)
        bad_set = set(blob["bad"].tolist())
        keep = torch.tensor([i not in bad_set for i in range(len(labels))], dtype=torch.bool)
        if files is not None:
            skipped += [_relative(files[i], root) for i in sorted(bad_set)]
        all_images.append(blob["images"][keep])
        all_labels.append(torch.tensor(labels, dtype=torch.int64)[keep])
        tags += [split] * int(keep.sum())
    images = torch.cat(all_images)
    labels = torch.cat(all_labels)
    return classes, images, labels, tags, torch.ones(len(labels), dtype=torch.bool), skipped


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
    _resample(interpolation)
    kind, src = _resolve(spec, progress)
    if kind == "torchvision":
        name = src.cls
        classes, images, labels, tags, keep, skipped = _decode_torchvision(
            src, name, image_size, interpolation, progress
        )
        label = f"torchvision:{name}"
    else:
        classes = src.classes
        images, labels, tags, keep, skipped = _decode_folder(
            src, image_size, interpolation, progress
        )
        label = src.label
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
    pool, carve_val, carve_test = _carve(counts)
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
    tr, va, te = _split_indices(labels[pool_idx], len(classes), vf, tf, seed)
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
    )


# ---------------------------------------------------------------------------------------------
# batches


def _seed_for(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little")


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
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

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


def _rand(generator: torch.Generator | None, shape, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def augment_batch(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Returns uint8 images with `mode` (none | flip | crop) applied per image, same device.

    crop is a random-resized crop (area 35-100 %, aspect 3/4-4/3, as torchvision samples it)
    back to the same size, plus a random horizontal flip, done for the whole batch at once
    with two batched matrix products (bilinear, borders clamped).
    """
    if mode == "none" or len(images) == 0:
        return images
    b = images.shape[0]
    if mode == "flip":
        flip = _rand(generator, (b,), images.device) < 0.5
        return torch.where(flip[:, None, None, None], images.flip(-1), images)
    if mode != "crop":
        raise ValueError(f"unknown augment {mode!r}; choose none, flip or crop")
    h, w = images.shape[-2:]
    draws = _rand(generator, (b, 42), "cpu").double().tolist()  # 10 attempts x 4, flip, spare
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    params = []
    for r in draws:
        cw, ch, top, left = w, h, 0.0, 0.0  # the whole image when no attempt fits
        for k in range(10):  # torchvision's RandomResizedCrop: the first attempt that fits
            area = (0.35 + 0.65 * r[4 * k]) * h * w
            ratio = math.exp(lo + (hi - lo) * r[4 * k + 1])
            tw, th = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < tw <= w and 0 < th <= h:
                cw, ch = tw, th
                top = math.floor(r[4 * k + 2] * (h - th + 1))
                left = math.floor(r[4 * k + 3] * (w - tw + 1))
                break
        # Output pixel x (normalised, align_corners=False) samples the source at a*x + t.
        ax = -cw / w if r[40] < 0.5 else cw / w
        params.append((ax, (2 * left + cw) / w - 1, ch / h, (2 * top + ch) / h - 1))
    p = torch.tensor(params, dtype=torch.float32).to(images.device)
    # Axis-aligned crop + bilinear resize is separable: out = Ry @ image @ Rx^T per image,
    # two small batched matmuls (much cheaper than grid_sample on CPU).
    rx = _interp_matrix(p[:, 0], p[:, 1], w, w)  # [B, S, W]
    ry = _interp_matrix(p[:, 2], p[:, 3], h, h)  # [B, S, H]
    b, c = images.shape[:2]
    cols = (images.float().view(b, c * h, w) @ rx.transpose(1, 2)).view(b, c, h, w)
    return (ry[:, None] @ cols).round_().to(torch.uint8)


def _interp_matrix(a: torch.Tensor, t: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """Returns [B, n_out, n_in] bilinear weights sampling normalised source a*x + t (border)."""
    xo = (torch.arange(n_out, dtype=torch.float32, device=a.device) * 2 + 1) / n_out - 1
    src = ((a[:, None] * xo + t[:, None]) + 1) * n_in / 2 - 0.5  # pixel coordinates
    src = src.clamp(0, n_in - 1)
    i0 = src.floor()
    frac = src - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=n_in - 1)
    m = torch.zeros((len(a), n_out, n_in), dtype=torch.float32, device=a.device)
    m.scatter_add_(2, i0[..., None], (1 - frac)[..., None])
    m.scatter_add_(2, i1[..., None], frac[..., None])
    return m


def normalize(images: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    """Returns (images/255 - mean)/std as dtype."""
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    mean_t = torch.as_tensor(mean, dtype=work, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=work, device=images.device).view(1, -1, 1, 1)
    x = images.to(work).mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)
    return x.to(dtype)
