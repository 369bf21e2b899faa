"""The built-in offline datasets: drawn shapes on textured backgrounds, written as PNG files.

Two tasks with disjoint classes: `shapes` (the target task users fine-tune on) and
`shapes-source` (the task the `builtin` weights are pretrained on). Both are generated
deterministically from a seed into an ImageFolder layout, so they go through the same
loading path as a user's own folder. Every image draws its randomness from its own
(seed, class, index) stream, so the bytes of a file never depend on generation order.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VERSION = 2  # bump when the drawing changes: cached folders are keyed by it
IMAGE_SIZE = 64  # pixels, square
SUPERSAMPLE = 2  # shape masks are drawn at this multiple and averaged down (anti-aliasing)

TARGET_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
SOURCE_CLASSES = (
    "pentagon",
    "hexagon",
    "ellipse",
    "arrow",
    "heart",
    "crescent",
    "diamond",
    "bar",
    "tee",
    "ell",
    "trapezoid",
    "semicircle",
)

# name -> (classes, images per class, default seed)
DATASETS = {
    "shapes": (TARGET_CLASSES, 250, 0),
    "shapes-source": (SOURCE_CLASSES, 250, 1),
}

# How hard the task is. The issue pins the target task's difficulty (ResNet-18 from random
# init at 64 px: 35-85 % val accuracy after one epoch, +10 points by epoch 5); these values
# were tuned against it with a small training loop.
KNOBS = {
    "radius": (0.24, 0.40),  # shape radius as a fraction of the image side
    "bg_contrast": 1.0,  # 0: flat background colour, 1: full-contrast textures
    "min_colour_diff": 120,  # shape colour vs the background under it, L1 over RGB, 0..765
    "occlusion_p": 0.5,  # probability of a distractor blob over the shape
    "occluder": (0.3, 0.55),  # its radius as a fraction of the shape's
    "noise": (2, 10),  # std of the pixel noise, drawn per image
    "class_colour_p": 0.0,  # probability that a shape has its class's own hue
    "class_hue_jitter": 0.03,  # +- that hue, as a fraction of the colour wheel
}
# Per dataset. From random init a ResNet-18 learns almost nothing about shape in the 19
# steps of a first epoch (measured: chance level, even with flat backgrounds), so the target
# task carries a partial colour cue: 80 % of its shapes have their class's hue (evenly
# spaced hues, jittered). Colour gives the fast first-epoch gains; the remaining images
# need shape, which is where pretrained (builtin) features pay off. The source task has a
# weaker cue, so that pretraining gets going quickly but must learn shape to do well.
DATASET_KNOBS = {
    "shapes": {"class_colour_p": 0.8},
    "shapes-source": {"class_colour_p": 0.5},
}

_STALE_TMP_S = 600  # a temporary folder older than this was left by a killed process


def folder_name(name: str) -> str:
    """Returns the cache folder name of a built-in dataset, e.g. `shapes-v1`."""
    return f"{name}-v{VERSION}"


def ensure(name: str, root: Path, *, progress=None) -> Path:
    """Returns root/<name>-v<VERSION>, generating it first when it is not there yet.

    Generation goes into a temporary sibling folder that is renamed into place at the end,
    so a killed process or two processes generating at once never leave half a dataset.
    """
    if name not in DATASETS:
        raise KeyError(name)
    root = Path(root)
    target = root / folder_name(name)
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    tmp = root / f".{folder_name(name)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate(name, tmp, progress=progress)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not another process winning the race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_tmp(root: Path) -> None:
    now = time.time()
    for p in root.glob(".*.tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def generate(
    name: str, dest: Path, *, seed: int | None = None, per_class: int | None = None, progress=None
) -> Path:
    """Writes dataset `name` into dest/<class>/<index>.png (dest must not exist yet).

    per_class < the dataset's size writes the first images of each class only (the same bytes).
    """
    classes, full_count, default_seed = DATASETS[name]
    per_class = full_count if per_class is None else per_class
    seed = default_seed if seed is None else seed
    dest = Path(dest)
    dest.mkdir(parents=True)
    total = len(classes) * per_class
    knobs = {**KNOBS, **DATASET_KNOBS.get(name, {})}
    last = time.monotonic()
    done = 0
    for c, cls in enumerate(classes):
        (dest / cls).mkdir()
        for i in range(per_class):
            img = draw_image(cls, np.random.default_rng([seed, c, i]), knobs=knobs)
            Image.fromarray(img).save(dest / cls / f"{i:04d}.png", optimize=False)
            done += 1
            if progress is not None and time.monotonic() - last > 0.25:
                last = time.monotonic()
                progress("data", done / total, f"generating builtin:{name} ({done}/{total})")
    meta = {"name": name, "version": VERSION, "seed": seed, "classes": list(classes)}
    meta["knobs"] = knobs
    meta["images_per_class"] = per_class
    (dest / "dataset.json").write_text(json.dumps(meta, indent=1))
    if progress is not None:
        progress("data", 1.0, f"generated builtin:{name} ({total} images)")
    return dest


# ---------------------------------------------------------------------------------------------
# drawing


def draw_image(
    cls: str, rng: np.random.Generator, size: int = IMAGE_SIZE, knobs: dict | None = None
) -> np.ndarray:
    """Returns one uint8 [size, size, 3] image of shape `cls`, all randomness from rng."""
    k = {**KNOBS, **(knobs or {})}
    bg = _background(rng, size, k["bg_contrast"])
    # The shape: random scale, position (kept mostly inside the frame), rotation, colour.
    radius = rng.uniform(*k["radius"]) * size
    cx = rng.uniform(radius * 0.8, size - radius * 0.8)
    cy = rng.uniform(radius * 0.8, size - radius * 0.8)
    angle = rng.uniform(0, 2 * math.pi)
    mask = _shape_mask(cls, cx, cy, radius, angle, size, rng)
    colour = _colour_against(bg, mask, rng, k["min_colour_diff"])
    if rng.random() < k["class_colour_p"]:
        colour = _class_colour(cls, rng, k["class_hue_jitter"])
    img = _paint(bg, mask, colour)
    # Occlusion: a distractor blob over part of the shape, half of the time.
    if rng.random() < k["occlusion_p"]:
        r = radius * rng.uniform(*k["occluder"])
        a = rng.uniform(0, 2 * math.pi)
        d = radius * rng.uniform(0.6, 1.1)
        blob = _blob_mask(cx + d * math.cos(a), cy + d * math.sin(a), r, size, rng)
        img = _paint(img, blob, rng.uniform(0, 255, 3))
    img = img + rng.normal(0, rng.uniform(*k["noise"]), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _class_colour(cls: str, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """Returns the class's own hue, jittered: a colour cue that holds for part of the images."""
    classes = TARGET_CLASSES if cls in TARGET_CLASSES else SOURCE_CLASSES
    hue = classes.index(cls) / len(classes) + rng.uniform(-1, 1) * jitter
    rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
    return np.asarray(rgb) * 255


def _paint(img: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    m = mask[..., None]
    return img * (1 - m) + np.asarray(colour, dtype=np.float64) * m


def _colour_against(bg: np.ndarray, mask: np.ndarray, rng: np.random.Generator, min_diff: float):
    """Returns a random colour that differs from the mean background under the shape."""
    under = (bg * mask[..., None]).sum((0, 1)) / max(mask.sum(), 1e-6)
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - under).sum() > min_diff:
            return colour
    return 255 - under


def _background(rng: np.random.Generator, size: int, contrast: float) -> np.ndarray:
    """Returns a float [size, size, 3] texture: noise, stripes, gradient or checker."""
    c1 = rng.uniform(0, 255, 3)
    c2 = c1 + (rng.uniform(0, 255, 3) - c1) * contrast
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    kind = rng.integers(4)
    if kind == 0:  # blotchy noise: low-resolution random field, upsampled
        cells = int(rng.integers(3, 12))
        field = rng.uniform(0, 1, (cells, cells))
        t = np.asarray(
            Image.fromarray((field * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
            dtype=np.float64,
        )
        t = t / 255
    elif kind == 1:  # stripes at a random angle and period
        a = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.35)
        u = xx * math.cos(a) + yy * math.sin(a)
        t = (np.sin(2 * math.pi * u / period) > 0).astype(np.float64)
    elif kind == 2:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * math.pi)
        u = xx * math.cos(a) + yy * math.sin(a)
        t = (u - u.min()) / max(u.max() - u.min(), 1e-6)
    else:  # checkerboard, slightly rotated
        a = rng.uniform(-0.5, 0.5)
        cell = rng.uniform(0.1, 0.3)
        u = xx * math.cos(a) + yy * math.sin(a)
        v = -xx * math.sin(a) + yy * math.cos(a)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64)
    t = t[..., None]
    return c1 * (1 - t) + c2 * t


def _unit_polygon(cls: str, rng: np.random.Generator) -> list[tuple[float, float]] | None:
    """Returns the outline of `cls` in unit coordinates (radius ~1), or None for round ones."""

    def regular(n, r=1.0, phase=0.0):
        return [
            (r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)
        ]

    if cls == "square":
        return regular(4, 1.0, math.pi / 4)
    if cls == "triangle":
        return regular(3, 1.1)
    if cls == "star":
        inner = rng.uniform(0.38, 0.5)
        return [
            (r * math.cos(math.pi * k / 5), r * math.sin(math.pi * k / 5))
            for k, r in zip(range(10), [1.1, inner] * 5, strict=True)
        ]
    if cls == "cross":
        w = rng.uniform(0.28, 0.4)
        return [
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
            (w, 1),
        ]
    if cls == "pentagon":
        return regular(5)
    if cls == "hexagon":
        return regular(6)
    if cls == "arrow":
        return [
            (-1, -0.25),
            (0.2, -0.25),
            (0.2, -0.65),
            (1, 0),
            (0.2, 0.65),
            (0.2, 0.25),
            (-1, 0.25),
        ]
    if cls == "heart":
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 16, -y / 16 + 0.1))
        return pts
    if cls == "diamond":
        return [(1, 0), (0, 0.55), (-1, 0), (0, -0.55)]
    if cls == "bar":
        return [(-1, -0.18), (1, -0.18), (1, 0.18), (-1, 0.18)]
    if cls == "tee":
        w = 0.22
        return [
            (-1, -1),
            (1, -1),
            (1, -1 + 2 * w),
            (w, -1 + 2 * w),
            (w, 1),
            (-w, 1),
            (-w, -1 + 2 * w),
            (-1, -1 + 2 * w),
        ]
    if cls == "ell":
        w = 0.3
        return [
            (-0.7, -1),
            (-0.7 + 2 * w, -1),
            (-0.7 + 2 * w, 1 - 2 * w),
            (0.8, 1 - 2 * w),
            (0.8, 1),
            (-0.7, 1),
        ]
    if cls == "trapezoid":
        return [(-1, 0.6), (1, 0.6), (0.45, -0.6), (-0.45, -0.6)]
    if cls == "semicircle":
        return [(math.cos(math.pi * k / 24), -math.sin(math.pi * k / 24) + 0.4) for k in range(25)]
    return None


def _shape_mask(cls, cx, cy, radius, angle, size, rng) -> np.ndarray:
    """Returns a float [size, size] coverage mask (0..1) of the shape, anti-aliased."""
    s = SUPERSAMPLE
    im = Image.new("L", (size * s, size * s), 0)
    d = ImageDraw.Draw(im)
    ca, sa = math.cos(angle), math.sin(angle)

    def place(x, y):
        return ((cx + radius * (x * ca - y * sa)) * s, (cy + radius * (x * sa + y * ca)) * s)

    def disk(x, y, r, fill, aspect=1.0):
        if aspect == 1.0:
            px, py = place(x, y)
            rr = radius * r * s
            d.ellipse([px - rr, py - rr, px + rr, py + rr], fill=fill)
        else:  # a rotated ellipse as a polygon
            pts = [
                place(x + r * math.cos(t), y + r * aspect * math.sin(t))
                for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)
            ]
            d.polygon(pts, fill=fill)

    if cls == "circle":
        disk(0, 0, 1.0, 255)
    elif cls == "ring":
        disk(0, 0, 1.0, 255)
        disk(0, 0, rng.uniform(0.5, 0.65), 0)
    elif cls == "ellipse":
        disk(0, 0, 1.0, 255, aspect=rng.uniform(0.45, 0.65))
    elif cls == "crescent":
        disk(0, 0, 1.0, 255)
        disk(rng.uniform(0.35, 0.55), 0, 0.85, 0)
    else:
        d.polygon([place(x, y) for x, y in _unit_polygon(cls, rng)], fill=255)
    im = im.resize((size, size), Image.BOX)
    return np.asarray(im, dtype=np.float64) / 255


def _blob_mask(cx, cy, r, size, rng) -> np.ndarray:
    """Returns a float mask of an irregular blob (a wobbly polygon) centred at (cx, cy)."""
    s = SUPERSAMPLE
    im = Image.new("L", (size * s, size * s), 0)
    n = 14
    radii = r * rng.uniform(0.7, 1.2, n)
    pts = [
        ((cx + q * math.cos(2 * math.pi * k / n)) * s, (cy + q * math.sin(2 * math.pi * k / n)) * s)
        for k, q in enumerate(radii)
    ]
    ImageDraw.Draw(im).polygon(pts, fill=255)
    im = im.resize((size, size), Image.BOX)
    return np.asarray(im, dtype=np.float64) / 255
