"""The `builtin` weights: a backbone pretrained on the built-in source task, the offline
stand-in for ImageNet weights. This module knows their recipe and where they are cached
(beside torchvision's downloads, named by a hash of the recipe, so caches of different
recipes never mix) and reads them; `pretrain.py` trains them with the engine."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from finetune_core import models
from finetune_core.data import shapes
from finetune_core.weights.base import WeightsError, first_line
from finetune_core.weights.hub import hub_checkpoints

# Bump RECIPE_VERSION whenever the training code changes what the weights would be.
RECIPE_VERSION = 2
BUILTIN_SOURCE = "builtin:shapes-source"
BUILTIN_IMAGE_SIZE = 64
# Measured on 2 idle CPU cores (AMD EPYC; ResNet-18, 64 px, source task v2, 2,700 training
# images), with a 3-epoch linear probe on builtin:shapes as the test of the features:
#   2 epochs: 29 s, 32 % source val accuracy, probe 68 % (lr 0.01) / 67 % (lr 0.1)
#   6 epochs: 89 s, 42 %, probe 73 % / 74 %  <- the recipe
#   6 epochs at lr 0.05: 34 %, 64 % / 66 %; with crop: 40 %, 71 % / 75 %;
#   8 epochs, lr 0.05, label smoothing 0.1: 119 s, 42 %, 70 % / 74 %; onecycle lr 0.1: worse.
# From random init the same probe scores 43 % / 35 %.
BUILTIN_EPOCHS = 6
BUILTIN_RECIPE = {
    "optimizer": "sgd",
    "lr": 0.03,
    "weight_decay": 5e-4,
    "batch_size": 64,
    "scheduler": "cosine",
    "warmup_epochs": 0.0,
    "augment": "flip",
    "label_smoothing": 0.0,
    "val_fraction": 0.1,
    "seed": 0,
}
BUILTIN_EPOCHS_ENV = "FINETUNE_BUILTIN_EPOCHS"
BUILTIN_STEPS_ENV = "FINETUNE_BUILTIN_MAX_STEPS"  # a cheapness knob for tests: stop after N steps


def _builtin_image_size(model: str) -> int:
    """Returns the pretraining size: 64 px, or what the architecture needs with weights."""
    try:
        spec = models.input_spec(model)
    except Exception:  # an unknown model: the model field reports it
        return BUILTIN_IMAGE_SIZE
    return spec.pretrained_size or max(BUILTIN_IMAGE_SIZE, spec.min_size)


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        raise WeightsError(f"{name} must be a whole number, got {value!r}") from None
    if n < 1:
        raise WeightsError(f"{name} must be at least 1, got {n}")
    return n


def recipe(model: str) -> dict:
    """Returns the settings the builtin weights of `model` are trained with (hashed into the
    cache file name)."""
    found = dict(BUILTIN_RECIPE)
    found.update(
        version=RECIPE_VERSION,
        data=BUILTIN_SOURCE,
        model=model,
        image_size=_builtin_image_size(model),
        epochs=_env_int(BUILTIN_EPOCHS_ENV, BUILTIN_EPOCHS),
        source_version=shapes.VERSION,  # a new drawing of the source task means new weights
    )
    max_steps = _env_int(BUILTIN_STEPS_ENV, None)
    if max_steps:
        found["max_steps"] = max_steps
    return found


def source_train_images(found: dict) -> int:
    """Returns how many training images the source task of a recipe has (cheap: counted from
    the dataset's definition, nothing is generated)."""
    classes, per_class, _ = shapes.DATASETS[found["data"].partition(":")[2]]
    return max(1, int(len(classes) * per_class * (1 - found["val_fraction"])))


def cache_file(model: str) -> Path:
    """Returns where the builtin weights of `model` are cached (whether or not they are)."""
    digest = hashlib.sha256(json.dumps(recipe(model), sort_keys=True).encode()).hexdigest()[:10]
    return hub_checkpoints() / f"finetune_builtin_{model}_{digest}.safetensors"


def source_accuracy(target: Path) -> float | None:
    """Returns the val accuracy the cached builtin weights reached on their source task (how
    good a stand-in for pretrained weights they are), or None when unknown."""
    from safetensors import safe_open

    try:
        with safe_open(str(target), framework="pt", device="cpu") as f:
            value = json.loads((f.metadata() or {}).get("source_val_acc", "null"))
    except Exception:  # missing or unreadable: read() says what to do about it
        return None
    return float(value) if isinstance(value, (int, float)) else None


def read(model: str, target: Path) -> dict[str, torch.Tensor]:
    """Returns the cached builtin weights at target; WeightsError saying what to do."""
    from safetensors.torch import load_file

    if not target.exists():
        raise WeightsError(
            f"the builtin weights for {model} are not trained yet (no {target}); "
            "finetune_core.pretrain.ensure_builtin trains them (every run does it first)."
        )
    try:
        return load_file(str(target), device="cpu")
    except Exception as e:
        raise WeightsError(
            f"the cached builtin weights for {model} at {target} cannot be read "
            f"({first_line(e)}); delete that file to train them again."
        ) from None
