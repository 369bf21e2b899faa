"""The scored images of a run, as small PNGs in one zip: what Compare shows when a confusion
cell is clicked.

The engine calls `write_scored_images` when a run completes, with the decoded val (and test)
images and the best checkpoint's predictions of each (the rows of predictions.csv). They are
the pixels the model was scored on (decoded, resized and cropped as training sees them,
before normalisation), so they hold for every data source, a torchvision set or an upload
whose extraction was pruned since, and need nothing of the data to read back.

The zip (stored, not compressed again: PNG already is) holds `<split>/<index>.png` per kept
image, `index` its row in predictions.csv, and `kept.json` ({"per_cell", "side"}). Per
confusion cell (true class, predicted class) it keeps at most PER_CELL images, in the order
Compare lists a cell: a mistake's most confident images first, a right answer's least
confident first (ties by index), so the size is bounded by the classes, not the split.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finetune_core.util.files import atomic_write

SCORED_IMAGES_FILE = "scored_images.zip"
PER_CELL = 32  # images kept per confusion cell and split
THUMBNAIL_PX = 96  # larger images are scaled down to this side (smaller ones kept as they are)


def cell_order(
    true: Sequence[int], pred: Sequence[int], confidence: Sequence[float]
) -> dict[tuple[int, int], list[int]]:
    """Returns {(true, pred): image indices}: each confusion cell's images, mistakes most
    confident first, right answers least confident first, ties by index."""
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (t, p) in enumerate(zip(true, pred, strict=True)):
        cells.setdefault((int(t), int(p)), []).append(i)
    for (t, p), members in cells.items():
        sign = -1.0 if t != p else 1.0
        members.sort(key=lambda i: (sign * float(confidence[i]), i))
    return cells


def _png(image: torch.Tensor, side: int) -> bytes:
    """Returns a uint8 [3, S, S] image as PNG bytes, scaled down to `side` when larger."""
    # numpy's copy: torch's contiguous() of one small image can cost 15 ms on a busy CPU
    pil = Image.fromarray(np.ascontiguousarray(image.cpu().numpy().transpose(1, 2, 0)), "RGB")
    if max(pil.size) > side:
        pil = pil.resize((side, side), Image.Resampling.BOX)
    out = io.BytesIO()
    pil.save(out, format="PNG", optimize=False)
    return out.getvalue()


def write_scored_images(
    path: str | Path,
    scored: Mapping[str, tuple[torch.Tensor, Mapping[str, Sequence]]],
    *,
    per_cell: int = PER_CELL,
    side: int = THUMBNAIL_PX,
) -> int:
    """Writes the zip of scored images ({split: (uint8 images [N, 3, S, S], an evaluation
    with "true", "pred" and "confidence" per image)}) atomically; returns how many it kept."""
    kept = 0

    def write(tmp: Path) -> None:
        nonlocal kept
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr("kept.json", json.dumps({"per_cell": per_cell, "side": side}))
            for split, (images, ev) in scored.items():
                cells = cell_order(ev["true"], ev["pred"], ev["confidence"])
                chosen = sorted(i for members in cells.values() for i in members[:per_cell])
                for i in chosen:
                    z.writestr(f"{split}/{i}.png", _png(images[i], side))
                kept += len(chosen)

    atomic_write(path, write)
    return kept
