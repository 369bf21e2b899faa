"""A run's weights files (checkpoints/best.safetensors, last.safetensors): the whole model,
or, for a run whose backbone never trains (a linear probe), only what trained plus a
reference to the backbone it was trained on: where it came from (the weights spec and the
seed) and the sha256 of its tensors. Loading such a file onto another backbone is refused,
so a run never silently gets another backbone (a new builtin recipe, say).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune_core import models
from finetune_core.util.files import atomic_write


def backbone_ref(parts: models.ModelParts, weights: str, seed: int) -> dict[str, Any]:
    """Returns the reference a head-only checkpoint keeps of the backbone it trained on."""
    digest = models.backbone_digest(parts.model.state_dict(), parts.head)
    return {"weights": weights, "seed": seed, "sha256": digest}


def save(
    path: Path,
    parts: models.ModelParts,
    model_name: str,
    ref: dict[str, Any] | None = None,
) -> None:
    """Writes the model's weights to path atomically: all of them, or with ref only the
    head's (the backbone is named by ref instead)."""
    state = parts.model.state_dict()
    if ref is not None:
        state = {k: v for k, v in state.items() if parts.is_head(k)}
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"model": model_name}
    if ref is not None:
        metadata["backbone"] = json.dumps(ref, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def reference(path: Path) -> dict[str, Any] | None:
    """Returns the backbone reference of a head-only weights file, None for a whole model."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get("backbone")
    return json.loads(raw) if raw else None


class BackboneChanged(RuntimeError):
    """A head-only checkpoint was loaded onto another backbone than the one it trained on."""


def load_onto(path: Path, parts: models.ModelParts) -> None:
    """Loads a weights file into parts' model: all of it, or a head-only file's head once the
    model's backbone is checked to be the one the file names (BackboneChanged otherwise)."""
    state = load_file(str(path))
    ref = reference(path)
    if ref is None:
        parts.model.load_state_dict(state)
        return
    found = models.backbone_digest(parts.model.state_dict(), parts.head)
    if found != ref["sha256"]:
        raise BackboneChanged(
            f"{path} keeps only its head, trained on the backbone of weights {ref['weights']} "
            f"(sha256 {ref['sha256'][:12]}…), but that backbone is now another one "
            f"(sha256 {found[:12]}…): those weights changed since (a new builtin recipe?). "
            "Train the run again, or start from other weights."
        )
    parts.model.load_state_dict(state, strict=False)
