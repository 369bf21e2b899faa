"""A run's per-image predictions (predictions.csv) and the scored images the engine kept
(scored_images.zip, finetune_core/data/thumbnails.py), read without torch."""

from __future__ import annotations

import csv
import json
import os
import zipfile
from pathlib import Path

import pandas as pd

from finetune_core.store.runs import PREDICTIONS_FILE

SCORED_IMAGES_FILE = "scored_images.zip"  # <split>/<index>.png per kept image, kept.json
PREDICTION_COLUMNS = ["split", "index", "true", "pred", "confidence"]


def read_predictions(run_dir: str | os.PathLike) -> pd.DataFrame | None:
    """Returns predictions.csv as a frame (split, index, true and pred class indices,
    confidence), or None when the run has none readable (older runs, or not completed)."""
    path = Path(run_dir) / PREDICTIONS_FILE
    try:
        frame = pd.read_csv(path, dtype={"split": str})
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, pd.errors.ParserError):
        return None
    if list(frame.columns[: len(PREDICTION_COLUMNS)]) != PREDICTION_COLUMNS or frame.empty:
        return None
    for column in ("index", "true", "pred"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["confidence"] = pd.to_numeric(frame["confidence"], errors="coerce")
    frame = frame.dropna(subset=["index", "true", "pred"])
    return frame.astype({"index": "int64", "true": "int64", "pred": "int64"})


def scored_images(run_dir: str | os.PathLike) -> dict | None:
    """Returns what the run's scored_images.zip holds: {"splits": {split: set of indices},
    "per_cell": images kept per confusion cell, "side": their largest side in pixels}, or
    None when the run kept none (runs from before it did, or a zip that cannot be read)."""
    try:
        with zipfile.ZipFile(Path(run_dir) / SCORED_IMAGES_FILE) as z:
            names = z.namelist()
            kept = json.loads(z.read("kept.json")) if "kept.json" in names else {}
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        return None
    splits: dict[str, set[int]] = {}
    for name in names:
        split, _, file = name.partition("/")
        stem = file.removesuffix(".png")
        if file.endswith(".png") and stem.isdigit():
            splits.setdefault(split, set()).add(int(stem))
    return {"splits": splits, "per_cell": kept.get("per_cell"), "side": kept.get("side")}


def read_scored_images(run_dir: str | os.PathLike, split: str, indices) -> dict[int, bytes]:
    """Returns {index: PNG bytes} of the kept images among `indices` of a split (the others,
    and all of them for a run without scored_images.zip, are left out)."""
    found: dict[int, bytes] = {}
    try:
        with zipfile.ZipFile(Path(run_dir) / SCORED_IMAGES_FILE) as z:
            names = set(z.namelist())
            for i in indices:
                name = f"{split}/{int(i)}.png"
                if name in names:
                    found[int(i)] = z.read(name)
    except (OSError, zipfile.BadZipFile, ValueError):
        return {}
    return found
