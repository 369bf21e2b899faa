"""torchvision's datasets: downloaded on first use into the data folder, their official
splits kept, decoded once through the cache."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune_core.data import cache
from finetune_core.data.base import SAMPLES_PER_CLASS, DataError, DataInfo, data_dir
from finetune_core.data.decode import decode_files, resample, resize_tensor_images


@dataclass(frozen=True)
class TorchvisionSet:
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
    "CIFAR10": TorchvisionSet(
        "CIFAR10",
        {"train": {"train": True}, "test": {"train": False}},
        {"train": 50000, "test": 10000},
        "cifar-10-batches-py/",
        _words("airplane automobile bird cat deer dog frog horse ship truck"),
    ),
    "CIFAR100": TorchvisionSet(
        "CIFAR100",
        {"train": {"train": True}, "test": {"train": False}},
        {"train": 50000, "test": 10000},
        "cifar-100-python/",
        _CIFAR100,
    ),
    "MNIST": TorchvisionSet(
        "MNIST",
        {"train": {"train": True}, "test": {"train": False}},
        {"train": 60000, "test": 10000},
        "MNIST/raw/",
    ),
    "FashionMNIST": TorchvisionSet(
        "FashionMNIST",
        {"train": {"train": True}, "test": {"train": False}},
        {"train": 60000, "test": 10000},
        "FashionMNIST/raw/",
    ),
    "Flowers102": TorchvisionSet(
        "Flowers102",
        {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
        {"train": 1020, "val": 1020, "test": 6149},
        "flowers-102/",
    ),
    "OxfordIIITPet": TorchvisionSet(
        "OxfordIIITPet",
        {"train": {"split": "trainval"}, "test": {"split": "test"}},
        {"train": 3680, "test": 3669},
        "oxford-iiit-pet/",
        _PETS,
    ),
    "Food101": TorchvisionSet(
        "Food101",
        {"train": {"split": "train"}, "test": {"split": "test"}},
        {"train": 75750, "test": 25250},
        "food-101/",
        _FOOD101,
    ),
    "EuroSAT": TorchvisionSet(
        "EuroSAT",
        {"all": {}},
        {"all": 27000},
        "eurosat/2750/",
        _words(
            "AnnualCrop Forest HerbaceousVegetation Highway Industrial Pasture PermanentCrop "
            "Residential River SeaLake"
        ),
    ),
    "DTD": TorchvisionSet(
        "DTD",
        {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
        {"train": 1880, "val": 1880, "test": 1880},
        "dtd/dtd/",
        _DTD,
    ),
    "STL10": TorchvisionSet(
        "STL10",
        {"train": {"split": "train"}, "test": {"split": "test"}},
        {"train": 5000, "test": 8000},
        "stl10_binary/",
        _words("airplane bird car cat deer dog horse monkey ship truck"),
    ),
}


def _tv_classes(entry: TorchvisionSet) -> list[str]:
    if entry.classes is not None:
        return list(entry.classes)
    import torchvision.datasets as tvd

    return list(getattr(tvd, entry.cls).classes)


def _tv_root() -> Path:
    return data_dir() / "torchvision"


def find(name: str) -> TorchvisionSet:
    by_lower = {k.lower(): k for k in TORCHVISION}
    key = by_lower.get(name.lower())
    if key is None:
        close = difflib.get_close_matches(name, list(TORCHVISION), n=1, cutoff=0.5)
        hint = f" Did you mean torchvision:{close[0]}?" if close else ""
        raise DataError(
            f"unknown torchvision dataset {name!r}; choose one of {', '.join(TORCHVISION)}.{hint}"
        )
    return TORCHVISION[key]


def _tv_open(entry: TorchvisionSet, split: str, *, download: bool):
    import torchvision.datasets as tvd

    return getattr(tvd, entry.cls)(str(_tv_root()), download=download, **entry.splits[split])


def _tv_downloaded(entry: TorchvisionSet) -> bool:
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


def _tv_download_error(entry: TorchvisionSet, name: str, err: Exception) -> DataError:
    root = _tv_root()
    return DataError(
        f"could not download torchvision:{name} into {root} "
        f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}). "
        f"Connect to the network and try again, or put the dataset's files there yourself "
        f"(torchvision.datasets.{entry.cls} expects {root / entry.folder}), "
        f"or choose other data: a folder of images, a .zip, or builtin:shapes (no download)."
    )


def inspect(spec: str, entry: TorchvisionSet) -> DataInfo:
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


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def decode(entry: TorchvisionSet, name: str, size, interpolation, progress):
    """Returns (classes, images, labels, split tags, keep mask, skipped files), downloading
    the dataset first when it is not in the data folder."""
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
        key = ["torchvision", entry.cls, split, len(labels), size, resample(interpolation).name]
        cached = cache.path_for(key)
        blob = cache.load(cached)
        if blob is None:
            if files is not None:
                images, bad = decode_files(files, size, resample(interpolation), progress)
            else:
                raw = ds.data
                raw = torch.as_tensor(np.asarray(raw))
                if raw.ndim == 3:  # MNIST-like: [N, H, W] grey
                    raw = raw[:, None].expand(-1, 3, -1, -1)
                elif raw.shape[-1] == 3:  # CIFAR: [N, H, W, 3]
                    raw = raw.permute(0, 3, 1, 2)
                if progress is not None:
                    progress("data", None, f"resizing {len(raw)} torchvision:{name} images")
                images, bad = resize_tensor_images(raw, size, interpolation), []
            blob = {"images": images, "bad": torch.tensor(bad, dtype=torch.int64)}
            cache.store(cached, blob)
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


@dataclass
class TorchvisionSource:
    """torchvision:NAME as a data source."""

    spec: str
    entry: TorchvisionSet

    @property
    def label(self) -> str:
        return f"torchvision:{self.entry.cls}"

    def inspect(self) -> DataInfo:
        return inspect(self.spec, self.entry)

    def decode(self, size: int, interpolation: str, progress):
        return decode(self.entry, self.entry.cls, size, interpolation, progress)

    def unreadable(self) -> list[str]:
        """torchvision's datasets are checked by torchvision (checksums): nothing to list."""
        return []
