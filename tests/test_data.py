"""Data specs, decoding, splits, the tensor loader, augmentation and the built-in datasets."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_core import data
from finetune_core.data import DataError, shapes, zips

SIZE = 16


@pytest.fixture
def data_home(tmp_path, monkeypatch) -> Path:
    """A private FINETUNE_DATA_DIR, so caches and extractions start empty."""
    home = tmp_path / "data-home"
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(home))
    return home


def _png(path: Path, colour=(200, 30, 30), mode="RGB", size=(20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path)
    return path


def _folder(root: Path, counts: dict[str, int], sub: str = "") -> Path:
    """Writes counts[class] small PNGs per class under root/sub/class; returns root."""
    for k, (cls, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            _png(root / sub / cls / f"{i:03d}.png", colour=(40 * k, 10 * i % 255, 90))
    return root


# ---------------------------------------------------------------------------------------------
# specs and layouts


def test_flat_folder_lists_classes_counts_and_sample_paths(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"cat": 3, "dog": 5})
    (root / "dog" / ".DS_Store").write_text("x")  # hidden files are not images of the class
    info = data.inspect_data(str(root))
    assert info.classes == ["cat", "dog"]
    assert info.counts == {"all": {"cat": 3, "dog": 5}}
    assert not info.has_splits and not info.needs_download
    assert [Path(p).name for p in info.samples["cat"]] == ["000.png", "001.png", "002.png"]
    assert all(Path(p).is_file() for ps in info.samples.values() for p in ps)


def test_train_val_test_folders_are_used_as_given(tmp_path, data_home):
    root = tmp_path / "ds"
    _folder(root, {"a": 4, "b": 6}, "train")
    _folder(root, {"a": 2, "b": 1}, "val")
    _folder(root, {"a": 1, "b": 3}, "test")
    info = data.inspect_data(str(root))
    assert info.has_splits
    assert info.counts == {
        "train": {"a": 4, "b": 6},
        "val": {"a": 2, "b": 1},
        "test": {"a": 1, "b": 3},
    }
    d = data.load_data(str(root), image_size=SIZE, val_fraction=0.5, test_fraction=0.5)
    assert (len(d.train), len(d.val), len(d.test)) == (10, 3, 4)
    assert data.class_counts(d.val, 2).tolist() == [2, 1]
    assert d.train.images.shape == (10, 3, SIZE, SIZE) and d.train.images.dtype == torch.uint8


def test_train_folder_without_val_gets_a_stratified_val_split(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"a": 10, "b": 10}, "train")
    _folder(root, {"a": 2, "b": 2}, "test")
    info = data.inspect_data(str(root))
    assert not info.has_splits
    d = data.load_data(str(root), image_size=SIZE, val_fraction=0.2, test_fraction=0.3)
    assert data.class_counts(d.val, 2).tolist() == [2, 2]
    assert data.class_counts(d.test, 2).tolist() == [2, 2]  # the folder's, not carved
    assert len(d.train) == 16


def test_zip_is_extracted_once_into_a_cache_keyed_by_its_hash(tmp_path, data_home):
    src = _folder(tmp_path / "ds", {"cat": 2, "dog": 2})
    zpath = tmp_path / "pets.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(src.rglob("*.png")):
            zf.write(p, Path("pets") / p.relative_to(src))  # wrapped in one top folder
        zf.writestr("__MACOSX/pets/._junk", b"junk")
    info = data.inspect_data(str(zpath))
    assert info.classes == ["cat", "dog"] and info.counts["all"] == {"cat": 2, "dog": 2}
    extracted = Path(info.samples["cat"][0])
    assert data_home in extracted.parents
    assert not list(data_home.rglob("__MACOSX"))
    first_mtime = extracted.stat().st_mtime_ns
    again = data.inspect_data(str(zpath))
    assert again.samples == info.samples
    assert extracted.stat().st_mtime_ns == first_mtime  # reused, not extracted again
    d = data.load_data(str(zpath), image_size=SIZE, val_fraction=0.5)
    assert len(d.train) + len(d.val) == 4


@pytest.mark.parametrize("member", ["../evil.png", "/tmp/evil-abs.png", "ok/../../evil.png"])
def test_zip_with_path_outside_the_folder_is_refused(tmp_path, data_home, member):
    zpath = tmp_path / "bad.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("a/1.png", b"x")
        zf.writestr(member, b"evil")
    with pytest.raises(DataError, match="not safe to extract"):
        data.inspect_data(str(zpath))
    assert not (tmp_path / "evil.png").exists()
    assert not Path("/tmp/evil-abs.png").exists()
    assert not list((data_home / "zips").glob("*/a")) if (data_home / "zips").exists() else True


def test_zip_with_symlink_is_refused(tmp_path, data_home):
    zpath = tmp_path / "link.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        info = zipfile.ZipInfo("a/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
        zf.writestr("b/1.png", b"x")
    with pytest.raises(DataError, match="symbolic link"):
        data.inspect_data(str(zpath))


def test_zip_that_unpacks_beyond_the_size_limit_is_refused(tmp_path, data_home, monkeypatch):
    zpath = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/1.png", b"\0" * 2_000_000)  # compresses to a few kB
        zf.writestr("b/1.png", b"\0" * 2_000_000)
    monkeypatch.setattr(zips, "ZIP_MAX_BYTES", 1_000_000)
    with pytest.raises(DataError, match="zip bomb"):
        data.inspect_data(str(zpath))
    assert not list((data_home / "zips").glob("*/a"))


def test_missing_path_error_names_the_path(tmp_path, data_home):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataError, match="does not exist") as e:
        data.inspect_data(str(missing))
    assert str(missing) in str(e.value) and "builtin:shapes" in str(e.value)


def test_unknown_spec_forms_list_the_choices(data_home):
    with pytest.raises(DataError, match="unknown data spec form 'hf:'"):
        data.inspect_data("hf:cifar10")
    with pytest.raises(DataError, match="Did you mean torchvision:CIFAR10"):
        data.inspect_data("torchvision:CIFAR1O")
    with pytest.raises(DataError, match="builtin:shapes or builtin:shapes-source"):
        data.inspect_data("builtin:circles")


def test_folder_with_fewer_than_two_classes_is_refused(tmp_path, data_home):
    root = _folder(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError, match="fewer than two classes.*'only'"):
        data.inspect_data(str(root))
    flat = tmp_path / "flat"
    _png(flat / "1.png")
    with pytest.raises(DataError, match="image files but no class subfolders"):
        data.inspect_data(str(flat))


def test_empty_class_folder_is_refused_with_its_name(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"cat": 3, "dog": 3})
    (root / "emu").mkdir()
    with pytest.raises(DataError, match="class 'emu' is empty") as e:
        data.inspect_data(str(root))
    assert str(root / "emu") in str(e.value)


def test_check_split_says_which_class_is_too_small(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"cat": 2, "dog": 9})
    info = data.inspect_data(str(root))
    assert data.check_split(info, 0.2, 0.0) is None  # 1 train + 1 val
    msg = data.check_split(info, 0.2, 0.1)
    assert msg is not None and "'cat' has 2 images" in msg and "at least 3" in msg
    assert "val/" in data.check_split(info, 0.0, 0.0)  # no val folder needs a val fraction


def test_torchvision_not_downloaded_is_reported_with_class_names(data_home):
    info = data.inspect_data("torchvision:cifar10")
    assert info.needs_download
    assert info.classes[:3] == ["airplane", "automobile", "bird"] and len(info.classes) == 10
    assert sum(info.counts["train"].values()) == 50000
    assert not (data_home / "torchvision").exists()  # inspecting downloads nothing


def test_torchvision_download_failure_says_where_to_put_the_files(data_home, monkeypatch):
    # An unreachable proxy makes the download fail at once, with or without a network.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(DataError) as e:
        data.load_data("torchvision:MNIST", image_size=SIZE)
    msg = str(e.value)
    assert "could not download torchvision:MNIST" in msg
    assert str(data_home / "torchvision" / "MNIST" / "raw") in msg
    assert "builtin:shapes" in msg


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Writes an MNIST-format (IDX) file: magic (uint8, ndim), big-endian dims, bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_downloaded_torchvision_dataset_loads_with_its_official_splits(data_home):
    # A tiny MNIST in torchvision's file layout stands in for a finished download.
    raw = data_home / "torchvision" / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", 2), ("t10k", 1)):
        labels = np.repeat(np.arange(10), per_class)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (len(labels), 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    info = data.inspect_data("torchvision:MNIST")
    assert not info.needs_download and info.classes[0] == "0 - zero"
    assert info.counts == {
        "train": {c: 2 for c in info.classes},
        "test": {c: 1 for c in info.classes},
    }
    d = data.load_data("torchvision:MNIST", image_size=SIZE, val_fraction=0.5)
    assert (len(d.train), len(d.val), len(d.test)) == (10, 10, 10)
    assert d.test.images.shape == (10, 3, SIZE, SIZE) and d.test.images.dtype == torch.uint8
    grey = d.test.images.int()
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


# ---------------------------------------------------------------------------------------------
# decoding


def test_grayscale_palette_rgba_cmyk_and_16bit_images_become_rgb(tmp_path, data_home):
    root = tmp_path / "ds"
    _png(root / "a" / "grey.png", (120, 120, 120), mode="L")
    _png(root / "a" / "palette.png", (10, 200, 30), mode="P")
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent -> white
    rgba.save(root / "a" / "transparent.png")
    (root / "b").mkdir()
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "b" / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(root / "b" / "deep.png")
    d = data.load_data(str(root), image_size=SIZE, val_fraction=0.4)
    assert d.skipped_files == []
    images = torch.cat([d.train.images, d.val.images])
    labels = torch.cat([d.train.labels, d.val.labels])
    assert images.shape[1:] == (3, SIZE, SIZE) and images.dtype == torch.uint8
    colours = {tuple(int(v) for v in img[:, 8, 8]) for img in images}
    assert (120, 120, 120) in colours  # grey copied to the three channels
    assert (255, 255, 255) in colours  # transparency composited onto white, not black
    assert any(abs(c[0] - 10) < 3 and abs(c[1] - 200) < 3 for c in colours)  # palette
    assert any(c[0] > 230 and c[1] < 30 and c[2] < 30 for c in colours)  # CMYK red
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]


def test_resize_takes_the_centre_of_the_shorter_side(tmp_path, data_home):
    root = tmp_path / "ds"
    wide = np.zeros((16, 48, 3), dtype=np.uint8)
    wide[:, 16:32] = 255  # white middle third, black sides: the centre crop is all white
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(wide).save(root / cls / f"{i}.png")
    d = data.load_data(str(root), image_size=8, val_fraction=0.5, interpolation="nearest")
    assert d.train.images.shape == (2, 3, 8, 8)
    assert bool((d.train.images == 255).all())


def test_truncated_png_and_text_file_are_skipped_and_listed(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"cat": 3, "dog": 3})
    good = (root / "cat" / "000.png").read_bytes()
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        big, "PNG"
    )
    (root / "cat" / "truncated.png").write_bytes(big.getvalue()[: len(big.getvalue()) // 2])
    (root / "dog" / "notes.txt").write_text("not an image")
    assert len(good) > 0
    d = data.load_data(str(root), image_size=SIZE, val_fraction=0.34)
    assert sorted(d.skipped_files) == ["cat/truncated.png", "dog/notes.txt"]
    assert len(d.train) + len(d.val) == 6


def test_class_whose_only_file_is_bad_fails_naming_the_class(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"cat": 3})
    (root / "dog").mkdir()
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="class 'dog'.*no readable image"):
        data.load_data(str(root), image_size=SIZE)


def test_decoded_cache_sees_a_changed_file(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"cat": 2, "dog": 2})
    first = data.load_data(str(root), image_size=SIZE, val_fraction=0.5)
    assert list((data_home / "decoded").glob("*.pt"))
    again = data.load_data(str(root), image_size=SIZE, val_fraction=0.5)
    assert torch.equal(first.train.images, again.train.images)
    target = root / "cat" / "000.png"
    _png(target, colour=(1, 2, 3))
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    changed = data.load_data(str(root), image_size=SIZE, val_fraction=0.5)
    all_images = torch.cat([changed.train.images, changed.val.images])
    assert any(tuple(int(v) for v in img[:, 0, 0]) == (1, 2, 3) for img in all_images)


def test_stratified_split_is_seeded_and_keeps_class_proportions(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"a": 20, "b": 10, "c": 5})
    kw = dict(image_size=4, val_fraction=0.2, test_fraction=0.2)
    d1 = data.load_data(str(root), seed=3, **kw)
    d2 = data.load_data(str(root), seed=3, **kw)
    d3 = data.load_data(str(root), seed=4, **kw)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(d1, split).images, getattr(d2, split).images)
    assert data.class_counts(d1.val, 3).tolist() == [4, 2, 1]
    assert data.class_counts(d1.test, 3).tolist() == [4, 2, 1]
    assert data.class_counts(d1.train, 3).tolist() == [12, 6, 3]
    assert not torch.equal(d1.val.images, d3.val.images)  # another seed, another split
    everything = torch.cat([d1.train.images, d1.val.images, d1.test.images]).flatten(1)
    assert len({tuple(r.tolist()) for r in everything}) == 35  # no image in two splits


def test_progress_reports_the_data_stage(tmp_path, data_home):
    root = _folder(tmp_path / "ds", {"a": 3, "b": 3})
    calls = []
    data.load_data(str(root), image_size=SIZE, progress=lambda *a: calls.append(a))
    assert calls and all(stage == "data" for stage, _, _ in calls)
    assert calls[-1][1] == 1.0


# ---------------------------------------------------------------------------------------------
# loader, augmentation, normalisation


def _split(counts) -> data.TensorSplit:
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)
    return data.TensorSplit(images.contiguous(), labels)


def _order(loader) -> list[int]:
    return [int(v) for x, _ in loader for v in x[:, 0, 0, 0]]


def test_tensor_loader_order_is_reproducible_per_epoch(tmp_path):
    split = _split([30, 20])
    a = data.TensorLoader(split, 8, shuffle=True, seed=1)
    b = data.TensorLoader(split, 8, shuffle=True, seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert _order(a) == _order(b)
    assert sorted(_order(a)) == list(range(50))
    b.set_epoch(3)
    assert _order(a) != _order(b)
    assert len(a) == 7 and len(data.TensorLoader(split, 8, shuffle=True, drop_last=True)) == 6
    assert len(_order(data.TensorLoader(split, 8, shuffle=True, drop_last=True))) == 48
    assert _order(data.TensorLoader(split, 8, shuffle=False)) == list(range(50))
    x, y = next(iter(a))
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape == (8, 3, 4, 4)
    assert torch.equal(y, split.labels[x[:, 0, 0, 0].long()])


def test_balanced_loader_draws_classes_about_equally(tmp_path):
    split = _split([270, 30])
    loader = data.TensorLoader(split, 50, shuffle=True, seed=0, balanced=True)
    labels = []
    for epoch in range(5):
        loader.set_epoch(epoch)
        labels += [y for _, ys in loader for y in ys.tolist()]
    assert len(labels) == 5 * 300  # the same epoch length as without balancing
    share = sum(labels) / len(labels)
    assert 0.42 < share < 0.58  # class 1 is 10 % of the data but drawn half of the time


@pytest.mark.parametrize("mode", ["none", "flip", "crop"])
def test_augment_batch_keeps_shape_dtype_and_is_deterministic(mode):
    images = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8)
    a = data.augment_batch(images, mode, torch.Generator().manual_seed(5))
    b = data.augment_batch(images, mode, torch.Generator().manual_seed(5))
    assert a.shape == images.shape and a.dtype == torch.uint8 and a.device == images.device
    assert torch.equal(a, b)
    if mode == "none":
        assert torch.equal(a, images)
    else:
        c = data.augment_batch(images, mode, torch.Generator().manual_seed(6))
        assert not torch.equal(a, c)


def test_flip_mirrors_some_images_and_leaves_the_others():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = data.augment_batch(images, "flip", torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def test_crop_zooms_into_the_image_and_keeps_its_geometry():
    # A centred white square on black covers 25 % of the image; crops of 35-100 % of the
    # area land on it more often than not, so on average they show more white.
    img = torch.zeros((1, 3, 32, 32), dtype=torch.uint8)
    img[..., 8:24, 8:24] = 255
    out = data.augment_batch(
        img.expand(64, -1, -1, -1).contiguous(), "crop", torch.Generator().manual_seed(0)
    )
    white = (out.float() / 255).mean(dim=(1, 2, 3))
    assert white.mean() > 0.3 and white.max() > 0.5
    assert len({round(v, 3) for v in white.tolist()}) > 20  # a different crop per image
    # A horizontal ramp stays a ramp: every row rises (or falls, when flipped), and crops
    # narrower than the image stretch it over a smaller range of values.
    ramp = (torch.arange(32) * 8).to(torch.uint8).expand(64, 3, 32, 32).contiguous()
    out = data.augment_batch(ramp, "crop", torch.Generator().manual_seed(1)).int()
    steps = out[..., 1:] - out[..., :-1]
    rising = (steps >= 0).flatten(1).all(1)
    falling = (steps <= 0).flatten(1).all(1)
    assert bool((rising | falling).all()) and 5 < int(falling.sum()) < 59
    span = out[..., -1].float().sub(out[..., 0].float()).abs().mean(dim=(1, 2))
    assert bool((span < 248).any())


def test_normalize_maps_uint8_to_standardised_floats():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(-1, 3, 2, 2)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    out = data.normalize(images, mean, std, torch.float32)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, -1.0, 0.0]))
    assert torch.allclose(out[1, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))
    assert data.normalize(images, mean, std, torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# built-in datasets


def test_builtin_shapes_has_its_classes_and_is_generated_deterministically(tmp_path):
    # Uses the session's data folder (conftest), so the dataset is generated once per session.
    stale = data.data_dir() / "builtin" / f".{shapes.folder_name('shapes')}.tmp-1-dead"
    if not (data.data_dir() / "builtin" / shapes.folder_name("shapes")).exists():
        (stale / "circle").mkdir(parents=True)  # a killed generation's leftovers
    info = data.inspect_data("builtin:shapes")
    assert len(info.classes) >= 6 and set(info.classes) == set(shapes.TARGET_CLASSES)
    assert set(info.counts["all"].values()) == {250}
    assert 1400 <= sum(info.counts["all"].values()) <= 1600
    root = Path(info.samples["circle"][0]).parents[1]
    assert root.name == shapes.folder_name("shapes")
    again = shapes.generate("shapes", tmp_path / "again", per_class=3)
    for cls in shapes.TARGET_CLASSES:
        for i in range(3):
            name = f"{cls}/{i:04d}.png"
            assert (again / name).read_bytes() == (root / name).read_bytes(), name
    with Image.open(root / "star" / "0000.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    other = shapes.generate("shapes", tmp_path / "other", seed=7, per_class=1)
    assert (other / "star/0000.png").read_bytes() != (root / "star/0000.png").read_bytes()


def test_builtin_source_task_has_other_classes():
    source = shapes.DATASETS["shapes-source"][0]
    assert len(source) >= 10
    assert not set(source) & set(shapes.TARGET_CLASSES)
    for cls in source:  # every class draws something distinct from the background
        img = shapes.draw_image(cls, np.random.default_rng(0))
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
