"""Decoding: every image read once with PIL, made 8-bit RGB, resized (shorter side) and
centre-cropped to a square, kept as uint8 tensors."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from finetune_core.data.base import DataError

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


def can_read(path: Path) -> bool:
    """Returns True when PIL recognises the file as an image whose data is intact (its
    header and, for PNG, every chunk's checksum); cheap: nothing is decoded."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # not an image, truncated, or unreadable
        return False


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
