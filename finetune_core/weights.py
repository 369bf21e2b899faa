"""Weight sources: torchvision download/cache, builtin (offline stand-in), local file, a run's best.

STUB: signatures are the contract other modules code against; the weights helper fills them in.
"""

from __future__ import annotations

from pathlib import Path

import torch


class WeightsError(RuntimeError):
    """Weights cannot be had; the message says what failed and what to do."""


def check_weights(spec: str, model: str, num_classes: int | None, *, runs_dir=None) -> str | None:
    """Returns a message when `spec` is malformed, a missing file/run, or a file of another
    architecture or class count; None otherwise. Never downloads nor trains."""
    raise NotImplementedError


def availability(spec: str, model: str) -> tuple[str, str]:
    """Returns (state, sentence): state is "cached", "download", "train" (builtin, first use),
    "ready" (file/run/none) or "unavailable", for the New run form."""
    raise NotImplementedError


def load_backbone_state(
    spec: str, model: str, *, num_classes: int | None = None, runs_dir=None, progress=None
) -> dict[str, torch.Tensor] | None:
    """Returns a state dict to pass to models.create_model(backbone_state=...), or None for
    "none". Raises WeightsError with the cache file path and other choices on failure."""
    raise NotImplementedError


def cache_file(spec: str, model: str) -> Path | None:
    """Returns where "default" or "builtin" weights for `model` live in the torch hub cache."""
    raise NotImplementedError
