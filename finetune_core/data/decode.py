"""Decoding: every image read once with PIL, made 8-bit RGB, resized (shorter side) and
centre-cropped to a square, kept as uint8 tensors.

Files come from strangers, so what PIL may do with them is bounded here, per call, without
touching PIL's global settings (other code in the process keeps its own): only the formats
of IMAGE_FORMATS are opened, and an image whose size (read from its header) exceeds
FINETUNE_IMAGE_MAX_PIXELS is refused before a pixel is decoded.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from finetune_core.data.base import DataError, env_limit

# The formats photos and datasets come in. Pillow can open some forty more (EPS calls
# Ghostscript; PSD, ICNS, FLI, PCX, SGI, TGA, DDS, JPEG 2000 ... are rare in datasets and
# their decoders have had most of Pillow's advisories); a stranger's file in one of those
# is skipped as unreadable instead of reaching that decoder. TIFF stays (microscopy,
# satellite and scanned data), PPM (the netpbm family: old benchmarks); MPO (the JPEG
# variant many phones write) opens as JPEG.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
IMAGE_FORMAT_NAMES = "JPEG, PNG, WebP, BMP, GIF, TIFF or PPM"
# Pixels one image may decode to (FINETUNE_IMAGE_MAX_PIXELS): 40 M is a 7300x5500 photo
# (~120 MB as RGB, ~4x that at the peak of conversion and resizing); Pillow's own default
# warns at 89 M and refuses at 179 M. A JPEG counts at the reduced scale it is decoded at
# (down to 1/8 of each side for small image sizes), so phone photos of 50-200 MP still load.
IMAGE_MAX_PIXELS = 40_000_000
_LARGE_PIXELS = 16_000_000  # images above this decode one at a time (memory, not speed)
_large_image = threading.Lock()

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resample(interpolation) -> Image.Resampling:
    name = str(getattr(interpolation, "value", interpolation)).lower().rpartition(".")[2]
    if name not in INTERPOLATIONS:
        raise DataError(
            f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}."
        )
    return INTERPOLATIONS[name]


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


def max_pixels() -> int:
    """Returns how many pixels one image may decode to on this server."""
    return env_limit("FINETUNE_IMAGE_MAX_PIXELS", IMAGE_MAX_PIXELS)


def open_image(path: Path, size: int | None = None) -> Image.Image:
    """Returns the image at path opened, its header read and nothing decoded; for a JPEG,
    drafted to the smallest scale still >= size (1/8 when size is None).

    Raises DataError naming the file when it is not in IMAGE_FORMATS or decodes to more
    than max_pixels(); OSError as PIL raises it for a file it cannot read."""
    limit = max_pixels()
    try:
        im = Image.open(path, formats=IMAGE_FORMATS)
    except UnidentifiedImageError as e:
        raise DataError(
            f"{path} is not a {IMAGE_FORMAT_NAMES} image (other formats are not read)."
        ) from e
    except Image.DecompressionBombError as e:  # PIL's own limit, far above ours
        raise DataError(f"{path} is larger than {limit:,} pixels ({e}).") from e
    try:
        im.draft("RGB", (size or 1, size or 1))  # JPEG: a reduced scale; others: no-op
        w, h = im.size
        if w * h > limit:
            raise DataError(
                f"{path} is {w}x{h} pixels ({w * h / 1e6:.0f} MP), more than the "
                f"{limit / 1e6:g} MP an image may have here (FINETUNE_IMAGE_MAX_PIXELS); "
                f"shrink it, or remove it from the data."
            )
    except BaseException:
        im.close()
        raise
    return im


def decode_image(path: Path, size: int, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    """Returns the image at path as uint8 [size, size, 3]: RGB, shorter side resized, centre crop.

    Raises DataError for a format not read or too many pixels (see open_image), and whatever
    PIL raises for unreadable, truncated or non-image files.
    """
    with open_image(path, size) as im:
        w, h = im.size
        # Few images this large fit in memory at once: they take turns, the rest run freely.
        with _large_image if w * h > _LARGE_PIXELS else contextlib.nullcontext():
            im.load()
            return square_rgb(im, size, resample)


def square_rgb(im: Image.Image, size: int, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    """Returns a PIL image as training sees it: uint8 [size, size, 3], turned upright by its
    EXIF orientation, RGB, shorter side resized to size, centre crop (decode_image's steps
    after reading the file)."""
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


def image_problem(path: Path) -> str | None:
    """Returns why the file would be skipped (not an image, a format not read, too many
    pixels, damaged), or None when it looks readable; cheap: nothing is decoded."""
    try:
        with open_image(path) as im:
            im.verify()  # the header and, for PNG, every chunk's checksum
        return None
    except DataError as e:
        return str(e)
    except Exception as e:  # truncated, damaged or unreadable
        return f"{path} could not be read as an image ({type(e).__name__}: {e})."


def can_read(path: Path) -> bool:
    """Returns True when the file is an image of an allowed format and size whose data is
    intact (its header and, for PNG, every chunk's checksum); cheap: nothing is decoded."""
    return image_problem(path) is None


def unreadable(paths: list[Path]) -> list[int]:
    """Returns the indices of the paths can_read refuses, in order (threads: the files)."""
    with ThreadPoolExecutor(_workers()) as ex:
        ok = list(ex.map(can_read, paths, chunksize=64))
    return [i for i, good in enumerate(ok) if not good]


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def decode_files(paths: list[Path], size: int, resample, progress) -> tuple[torch.Tensor, list]:
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


def resize_tensor_images(images: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """Returns uint8 [N,3,H,W] images resized (shorter side) and centre-cropped to size."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    mode = InterpolationMode(resample(interpolation).name.lower())
    out = []
    for i in range(0, len(images), 2048):
        b = images[i : i + 2048]
        if b.shape[-2:] != (size, size):
            b = TF.resize(b, [size], interpolation=mode, antialias=True)
            b = TF.center_crop(b, [size, size])
        out.append(b.contiguous())
    return torch.cat(out) if out else images.new_zeros((0, 3, size, size))
