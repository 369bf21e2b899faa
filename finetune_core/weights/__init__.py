"""Weights: where a run's starting weights come from (default | builtin | PATH | run:RUN_ID |
none, see sources.py), read safely and checked key by key against the model.

`load_backbone_state` returns the state dict `models.create_model(backbone_state=...)`
takes; `check_weights` and `availability` say before a run whether that will work. The
builtin weights are trained by `pretrain.py`, above the engine; here they are only read.
"""

from __future__ import annotations

from pathlib import Path

from finetune_core.weights import builtin
from finetune_core.weights.base import SOURCES_HELP, WeightsError
from finetune_core.weights.sources import Builtin, Estimate, State, WeightsSource, source

builtin_recipe = builtin.recipe


def cache_file(spec: str, model: str) -> Path | None:
    """Returns where "default" or "builtin" weights for `model` live in the torch hub cache."""
    return source(spec).cache_file(model)


def is_builtin(spec: str) -> bool:
    """Returns True for the builtin weights, which pretrain.ensure_builtin trains on first use."""
    return isinstance(source(spec), Builtin)


def keeps_trained_head(spec: str) -> bool:
    """Returns True when weights from spec keep a head already trained for the data's classes
    (a file or an earlier run); ImageNet's and the source task's heads are for other classes."""
    return source(spec).keeps_head


def check_weights(spec: str, model: str, num_classes: int | None, *, runs_dir=None) -> str | None:
    """Returns a message when `spec` is malformed, a missing file/run, or a file of another
    architecture; None otherwise. Never downloads nor trains.

    A head with another class count is not a problem: it is dropped and a new head for the
    data's classes is trained (backbone only), for files and runs alike.
    """
    try:
        return source(spec).check(model, num_classes, runs_dir)
    except WeightsError as e:
        return str(e)


def availability(
    spec: str, model: str, *, runs_dir=None, estimate: Estimate | None = None
) -> tuple[str, str]:
    """Returns (state, sentence): state is "cached", "download", "train" (builtin, first use),
    "ready" (file/run/none) or "unavailable", for the New run form. `estimate(model)` gives
    the seconds pretraining builtin weights takes here, for the sentence."""
    try:
        return source(spec).availability(model, runs_dir, estimate)
    except WeightsError as e:
        return "unavailable", str(e)


def load_backbone_state(
    spec: str, model: str, *, num_classes: int | None = None, runs_dir=None, progress=None
) -> State | None:
    """Returns a state dict to pass to models.create_model(backbone_state=...), or None for
    "none". Raises WeightsError with the cache file path and other choices on failure.

    "default" is torchvision's file as it is (1000-class head included: create_model
    replaces it); files and runs keep their head only when it has num_classes rows.
    """
    return source(spec).load(model, num_classes, runs_dir, progress)


__all__ = [
    "SOURCES_HELP",
    "WeightsError",
    "WeightsSource",
    "availability",
    "builtin_recipe",
    "cache_file",
    "check_weights",
    "is_builtin",
    "keeps_trained_head",
    "load_backbone_state",
    "source",
]
