"""Using a finished run: its model, built and loaded as evaluation scored it, on new images.

`load_model(RUN)` returns a RunModel: `.model` (the plain torch model on CPU, in eval mode,
returning logits for normalised input), `.classes`, `.transform` (a PIL image -> the
normalised [3, S, S] tensor, the run's own preprocessing) and `.image_size`. `predict`
and `predict_files` give each image's top classes; an image the run's preprocessing cannot
read gets a message naming it, the rest are predicted.

The model is the one evaluation used (`run_parts`): engine.build_model for the run's
settings, its best weights (a head-only checkpoint's head on the backbone it names, checked
by sha256), then the strategy's `merged` hook, which makes a run with adapters (lora, ...)
torchvision's plain model with them merged in. A completed run of such a strategy keeps
its best weights merged already; vpt's prompts do not merge, so its model keeps them.

Files are read the way training read them (data.decode: the formats and pixel limit, EXIF
orientation, RGB, shorter side resized with the model's interpolation, centre crop), so the
model sees exactly the pixels a training image of the same file would have had.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from finetune_core import checkpoints, engine, heads, models, recipe, store, strategies, weights
from finetune_core.config import ConfigError, RunConfig
from finetune_core.data import DataError, augment_batch
from finetune_core.data.decode import decode_image, resample, square_rgb

BEST = "best.safetensors"
BATCH = 64  # images per forward pass
DEFAULT_TOP_K = 3
TTA_CHOICES = ("none", "flip", "augment")  # test-time augmentation (RunModel.probabilities)
MAX_FILES = 10_000  # images one call may predict (a folder given by mistake stops here)
_SKIPPED_NAMES = {"thumbs.db", "desktop.ini"}  # what data folders skip too
_SKIPPED_DIRS = {"__macosx"}


class PredictError(ValueError):
    """The run or the images cannot be used as given; the message says why and what to do."""


@dataclass(frozen=True)
class Preprocess:
    """The run's preprocessing: a PIL image -> the normalised float tensor [3, S, S]."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def pixels(self, image: Image.Image) -> np.ndarray:
        """Returns what the model sees of a PIL image before normalisation: uint8 [S, S, 3]."""
        return square_rgb(image, self.image_size, resample(self.interpolation))

    def read(self, source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
        """Returns a file's pixels as training decodes them (uint8 [S, S, 3]); raises
        PredictError naming the file (name, else its path) when it cannot be read."""
        shown = name or str(source)
        where = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
        try:
            return decode_image(where, self.image_size, resample(self.interpolation))
        except DataError as e:  # a format not read, too many pixels: the message names it
            raise PredictError(str(e).replace(str(where), shown)) from None
        except Exception as e:  # noqa: BLE001 - damaged, truncated, not an image
            raise PredictError(
                f"{shown} could not be read as an image ({type(e).__name__}: {e})."
            ) from None

    def normalise(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Returns uint8 pixels [S, S, 3] (or [N, S, S, 3]) as the model's float input."""
        x = torch.as_tensor(pixels)
        x = x.permute(2, 0, 1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x.float().div(255) - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalise(self.pixels(image))

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


@dataclass
class FilePrediction:
    """One image's prediction: its top classes with their probabilities, best first, and
    the pixels the model saw (uint8 [S, S, 3])."""

    file: str
    top: list[tuple[str, float]]
    pixels: np.ndarray


@dataclass
class RunModel:
    """A run's model ready to use (what load_model returns)."""

    model: nn.Module  # on the CPU, eval mode, parameters frozen; logits for normalised input
    classes: list[str]
    transform: Preprocess
    image_size: int
    model_name: str  # torchvision's name: resnet18, vit_b_16, ...
    strategy: str  # the run's strategy with its option: "last_n 1", "lora r8"
    run_dir: Path
    merged: bool = False  # adapters were merged into the model's weights (lora, ...)
    augment: str = "none"  # the run's training augmentation (what --tta augment applies)
    hflip: bool = True  # whether the run's augmentation mirrors images

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Returns the model's logits for normalised input [N, 3, S, S], in batches."""
        out = [self.model(batch[i : i + BATCH]) for i in range(0, len(batch), BATCH)]
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def top(self, batch: torch.Tensor, top_k: int = DEFAULT_TOP_K) -> list[list[tuple[str, float]]]:
        """Returns each input's top_k (class, probability), best first."""
        try:
            k = check_top_k(top_k, len(self.classes))
        except PredictError as e:
            raise PredictError(f"top_k {e}") from None
        probs = self.logits(batch).float().softmax(1)
        values, indices = probs.topk(k, dim=1)
        return [
            [(self.classes[i], float(p)) for p, i in zip(v.tolist(), ix.tolist(), strict=True)]
            for v, ix in zip(values, indices, strict=True)
        ]

    def check_tta(self, tta: str) -> str:
        """Returns tta when this run can predict with it, else raises PredictError saying
        what to choose (a mirror for data the run says a mirror changes, the run's
        augmentation when it had none)."""
        if tta not in TTA_CHOICES:
            raise PredictError(f"choose one of {', '.join(TTA_CHOICES)}, not {tta!r}")
        if tta == "flip" and not self.hflip:
            raise PredictError("the run was trained without mirroring (hflip off): use none")
        if tta == "augment" and self.augment == "none":
            raise PredictError("the run was trained without augmentation: use flip or none")
        return tta

    @torch.inference_mode()
    def probabilities(self, pixels: np.ndarray, tta: str = "none") -> torch.Tensor:
        """Returns the class probabilities of uint8 images [N, S, S, 3]; with test-time
        augmentation averaged as the run's evaluation averages them (recipe.tta_evaluate):
        flip = the mean of the softmax of each image and its mirror; augment = 0.25 x the
        image's + 0.75 x the mean of 4 views with the run's augmentation (seeded: the same
        every time)."""
        self.check_tta(tta)
        images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)

        def probs(uint8: torch.Tensor) -> torch.Tensor:
            return self.logits(self.transform.normalise(uint8.permute(0, 2, 3, 1))).softmax(1)

        plain = probs(images)
        if tta == "flip":
            return (plain + probs(images.flip(-1))) / 2
        if tta == "augment":
            views = [
                probs(
                    augment_batch(
                        images, self.augment, torch.Generator().manual_seed(view), flip=self.hflip
                    )
                )  # fmt: skip
                for view in range(recipe.TTA_VIEWS)
            ]
            return recipe.TTA_BETA * plain + (1 - recipe.TTA_BETA) * torch.stack(views).mean(0)
        return plain

    def _tops(self, pixels: np.ndarray, top_k: int, tta: str) -> list[list[tuple[str, float]]]:
        k = check_top_k(top_k, len(self.classes))
        values, indices = self.probabilities(pixels, tta).topk(k, dim=1)
        return [
            [(self.classes[i], float(p)) for p, i in zip(v.tolist(), ix.tolist(), strict=True)]
            for v, ix in zip(values, indices, strict=True)
        ]

    def predict(
        self,
        images: Sequence[Image.Image | str | os.PathLike],
        top_k: int = DEFAULT_TOP_K,
        *,
        tta: str = "none",
    ) -> list[list[tuple[str, float]]]:
        """Returns each image's (a PIL image, or a file read as training reads it) top_k
        (class, probability), best first; PredictError for a file it cannot read. tta:
        none, flip or augment (see probabilities)."""
        pixels = [
            self.transform.pixels(im) if isinstance(im, Image.Image) else self.transform.read(im)
            for im in images
        ]
        if not pixels:
            return []
        return self._tops(np.stack(pixels), top_k, tta)

    def predict_files(
        self,
        files: Iterable[tuple[str, str | os.PathLike | bytes]],
        top_k: int = DEFAULT_TOP_K,
        *,
        tta: str = "none",
    ) -> tuple[list[FilePrediction], list[str]]:
        """Returns (the predictions of the files that could be read, in order; a message per
        file that could not). files are (name shown, path or the file's bytes); tta as in
        probabilities."""
        self.check_tta(tta)
        read, problems = [], []
        for name, source in files:
            try:
                read.append((name, self.transform.read(source, name)))
            except PredictError as e:
                problems.append(str(e))
        if not read:
            return [], problems
        tops = self._tops(np.stack([p for _, p in read]), top_k, tta)
        found = [FilePrediction(n, t, p) for (n, p), t in zip(read, tops, strict=True)]
        return found, problems

    def describe(self) -> dict[str, Any]:
        """Returns what using the model needs beside its weights (export's model.json)."""
        return {
            "model": self.model_name,
            "strategy": self.strategy,
            "run_id": self.run_dir.name,
            "classes": list(self.classes),
            "num_classes": len(self.classes),
            **self.transform.as_dict(),
            "input": {"name": "input", "shape": ["batch", 3, self.image_size, self.image_size]},
            "output": {"name": "logits", "shape": ["batch", len(self.classes)]},
            "preprocessing": (
                "RGB, shorter side resized to image_size with interpolation, centre crop to "
                "image_size x image_size, pixel values / 255, then (x - mean) / std per channel"
            ),
            "adapters_merged": self.merged,
        }


def check_top_k(top_k: Any, n_classes: int) -> int:
    """Returns top_k as an int from 1 to the number of classes; PredictError otherwise."""
    try:
        k = int(top_k)
    except (TypeError, ValueError):
        k = 0
    if k < 1 or k > n_classes or str(top_k).strip() != str(k):
        raise PredictError(
            f"must be a whole number from 1 to {n_classes} (the run's classes), got {top_k!r}"
        )
    return k


def best_weights(run_dir: Path) -> Path:
    """Returns the run's best weights file; PredictError when it has none yet."""
    best = Path(run_dir) / "checkpoints" / BEST
    if not best.is_file():
        state = store.read_status(run_dir).get("state")
        raise PredictError(
            f"run {Path(run_dir).name} ({state}) has no best weights yet ({best} is missing): it "
            "has not finished an epoch. Wait for it, or pick a run that completed."
        )
    return best


def run_classes(run_dir: Path) -> list[str]:
    """Returns the classes the run was trained on (its summary's), in the head's order."""
    classes = (store.read_summary(run_dir) or {}).get("classes")
    if not isinstance(classes, list) or not classes:
        raise PredictError(
            f"run {Path(run_dir).name} has no summary.json listing its classes: it has not "
            "ended. Wait for it to end (or stop it), then use it."
        )
    return [str(c) for c in classes]


def run_parts(run_dir: Path) -> tuple[models.ModelParts, RunConfig, bool]:
    """Returns (the run's model as evaluation scored it, its config, whether adapters were
    merged into it): engine.build_model for the run's settings, its best weights loaded,
    then the strategy's merged hook. Raises PredictError when the run cannot be used."""
    run_dir = Path(run_dir)
    try:
        cfg = store.run_config(run_dir)
    except (store.RunError, ConfigError) as e:
        raise PredictError(f"run {run_dir.name}: its config.json cannot be used ({e})") from None
    best = best_weights(run_dir)
    classes = run_classes(run_dir)
    strategy = strategies.get(cfg.strategy)
    # A completed run of a strategy that adds pieces keeps its best weights merged into
    # torchvision's plain model (engine._save_added_pieces): build that model, not the
    # prepared one. Otherwise the file holds what the prepared model holds.
    merged_already = strategy.adds_pieces and checkpoints.unmerged_pieces(best) is None
    ref = checkpoints.reference(best)
    with torch.random.fork_rng(devices=[]):  # building initialises weights: not the caller's RNG
        backbone = None
        if ref is not None:  # a head-only file: the backbone it trained on, as it was made
            try:
                backbone = weights.load_backbone_state(
                    ref["weights"], cfg.model, num_classes=len(classes), runs_dir=run_dir.parent
                )
            except weights.WeightsError as e:
                raise PredictError(
                    f"run {run_dir.name} keeps only its head; its backbone ({ref['weights']}) "
                    f"cannot be loaded: {e}"
                ) from None
            torch.manual_seed(int(ref["seed"]))  # a random-init backbone is its seed's
        if merged_already:
            parts = models.create_model(
                cfg.model, len(classes), image_size=cfg.image_size, backbone_state=backbone
            )
            if cfg.head == "fastai":  # the head engine.build_model puts in its place
                heads.use_fastai_head(parts, len(classes), cfg.image_size)
        else:
            parts = engine.build_model(cfg, len(classes), backbone_state=backbone)
    try:
        checkpoints.load_onto(best, parts)
    except checkpoints.BackboneChanged as e:
        raise PredictError(str(e)) from None
    except (RuntimeError, OSError, ValueError) as e:
        raise PredictError(
            f"run {run_dir.name}: {best} does not load into its model ({str(e)[:300]}); the file "
            "is damaged or from another version: train the run again."
        ) from None
    plain = None if merged_already else strategy.merged(parts)
    if plain is not None:
        parts = plain
    return parts, cfg, merged_already or plain is not None


def load_model(run: str | os.PathLike, *, runs_dir: str | os.PathLike | None = None) -> RunModel:
    """Returns a finished run's model to use: a run id, a unique id prefix or a run folder
    (ids are looked up in runs_dir, default $FINETUNE_RUNS_DIR, else ./runs).

    `.model` is the plain torch model on the CPU in eval mode (parameters frozen; logits for
    normalised input), `.classes` its classes, `.transform` the run's preprocessing of a PIL
    image and `.image_size` its side; `.predict([image, ...])` gives the top classes.
    """
    run_dir = store.resolve_run(run, store.runs_dir(runs_dir))
    parts, cfg, merged = run_parts(run_dir)
    model = parts.model.float().cpu().eval().requires_grad_(False)
    spec = models.input_spec(cfg.model)
    transform = Preprocess(cfg.image_size, spec.mean, spec.std, spec.interpolation)
    return RunModel(
        model=model,
        classes=run_classes(run_dir),
        transform=transform,
        image_size=cfg.image_size,
        model_name=cfg.model,
        strategy=strategies.label(cfg),
        run_dir=run_dir,
        merged=merged,
        augment=cfg.augment,
        hflip=cfg.hflip,
    )


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name.lower() not in _SKIPPED_NAMES


def image_files(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """Returns (name shown, path) of every file to predict: files as given, a folder's files
    below it (sorted; hidden ones skipped, as data folders skip them). Raises PredictError
    for a path that does not exist, or more than MAX_FILES files."""
    found: list[tuple[str, Path]] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            for here, dirs, names in os.walk(path):
                dirs[:] = sorted(
                    d for d in dirs if not d.startswith(".") and d.lower() not in _SKIPPED_DIRS
                )
                for name in sorted(names):
                    file = Path(here) / name
                    if _visible(file) and file.is_file():
                        found.append((str(file), file))
                if len(found) > MAX_FILES:
                    break
        elif path.exists():
            found.append((str(given), path))
        else:
            raise PredictError(f"{given} does not exist; give image files or a folder of them")
        if len(found) > MAX_FILES:
            raise PredictError(
                f"more than {MAX_FILES:,} files to predict (in {given}); give fewer images"
            )
    return found


def predictions_table(found: Sequence[FilePrediction]):
    """Returns a DataFrame with one row per image: file, pred, prob, pred2, prob2, ... (the
    probabilities as fractions), what `predict --csv` writes and the Predict page shows."""
    import pandas as pd

    rows = []
    for p in found:
        row: dict[str, Any] = {"file": p.file}
        for rank, (cls, prob) in enumerate(p.top, start=1):
            suffix = "" if rank == 1 else str(rank)
            row[f"pred{suffix}"] = cls
            row[f"prob{suffix}"] = round(prob, 6)
        rows.append(row)
    return pd.DataFrame(rows)
