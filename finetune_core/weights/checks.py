"""Does a state dict fit a model? Key-by-key checks against the model's own layout (built on
the meta device), finite values, and fitting a file's head to the data's class count."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import torch

from finetune_core import models
from finetune_core.weights.files import read_file


@lru_cache(maxsize=32)
def layout(model: str, image_size: int | None) -> tuple[dict[str, tuple[int, ...]], str]:
    """Returns ({key: shape} of the model's state dict, head module path), built on meta."""
    kwargs = {} if image_size is None else {"image_size": image_size}
    parts = models.create_model(model, 2, device="meta", **kwargs)
    return models.shapes_of(parts.model.state_dict()), parts.head


def _is_head(key: str, head: str) -> bool:
    return key.startswith(head + ".")


def head_classes(state: dict, head: str) -> int | None:
    """Returns the class count of the head in `state` (rows of its weight), or None."""
    w = state.get(f"{head}.weight")
    return int(w.shape[0]) if w is not None and len(w.shape) >= 1 else None


def mismatches(state: dict, model: str, image_size: int | None = None) -> list[str]:
    """Returns what keeps `state` from loading into `model`'s backbone (empty when it fits).

    Head keys may have any shape (the head is replaced for K classes); aux-head keys and
    missing BatchNorm `num_batches_tracked` counters are ignored like create_model does.
    """
    expected, head = layout(model, image_size)
    found = models.backbone_mismatches(
        expected, models.shapes_of(state), head, counters_optional=True
    )
    shapes = [
        f"{k} is {list(given)} in the file but {list(want)} in {model}"
        for k, given, want in found.shapes
    ]
    problems = []
    for label, items in (
        ("missing keys", found.missing),
        ("unexpected keys", found.unexpected),
        ("other shapes", shapes),
    ):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    return problems


def fit_classes(state: dict, model: str, num_classes: int | None, image_size=None) -> dict:
    """Returns `state` with the head dropped unless it already has num_classes rows, and
    BatchNorm counters that older files lack filled in (create_model wants every key)."""
    expected, head = layout(model, image_size)
    if num_classes is None or head_classes(state, head) != num_classes:
        state = {k: v for k, v in state.items() if not _is_head(k, head)}
    return with_bn_counters(state, model)


def with_bn_counters(state: dict, model: str, image_size: int | None = None) -> dict:
    """Returns `state` with the BatchNorm num_batches_tracked counters it lacks set to 0."""
    expected, head = layout(model, image_size)
    missing = [
        k
        for k in expected
        if k.endswith("num_batches_tracked") and k not in state and not _is_head(k, head)
    ]
    if not missing:
        return state
    return {**state, **{k: torch.tensor(0, dtype=torch.long) for k in missing}}


def without_head(state: dict, head: str) -> dict:
    """Returns `state` without the head's keys."""
    return {k: v for k, v in state.items() if not _is_head(k, head)}


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Returns the name of the first floating-point tensor holding NaN or infinity, or None
    (meta tensors, which hold no values, are passed over)."""
    for name, t in tensors:
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            return name
    return None


def _tensors_of(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) of a weights file one at a time (safetensors read per tensor,
    pickles memory-mapped), so that a large file is never held whole for the check."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        read_file(path, lazy=True)  # a WeightsError naming the file for an unreadable one
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        yield from read_file(path, lazy=True).items()


@lru_cache(maxsize=32)
def _non_finite_in(path: str, size: int, mtime_ns: int) -> str | None:
    return first_non_finite(_tensors_of(Path(path)))


def non_finite_in_file(path: Path) -> str | None:
    """Returns the first tensor of a weights file holding NaN or infinity, or None; read once
    per version of the file (the form validates on every change)."""
    st = path.stat()
    return _non_finite_in(str(path.resolve()), st.st_size, st.st_mtime_ns)


def non_finite_message(label: str, tensor: str) -> str:
    """Returns the refusal of weights holding NaN or infinity, naming the file and tensor."""
    return (
        f"{label} holds values that are not finite (NaN or infinity), first in {tensor!r}: "
        "a model starting from them outputs NaN. Check how the file was made (a diverged "
        "training?), or choose other weights."
    )
