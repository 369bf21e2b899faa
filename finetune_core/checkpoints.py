"""A run's checkpoints: weights files and the resume point.

Weights files (checkpoints/best.safetensors and the resume point's) hold the whole model,
or, for a run whose backbone never trains (a linear probe), only what trained plus a
reference to the backbone it was trained on: where it came from (the weights spec and the
seed) and the sha256 of its tensors. Loading such a file onto another backbone is refused,
so a run never silently gets another backbone (a new builtin recipe, say).

The resume point is one atomic unit: checkpoints/last_state.pt (optimizer, scheduler, RNG
states, counters) names the weights file saved with it, one of two slots
(last-a.safetensors, last-b.safetensors). A save writes the slot the committed state does
not name, fsyncs it, then replaces last_state.pt atomically (fsynced): that replace is the
commit, so a kill at any moment leaves the old pair or the new one, never epoch-2 weights
with epoch-1 optimizer and RNG state. Run folders from before keep last.safetensors beside
a last_state.pt that names no slot, and still resume.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune_core import models
from finetune_core.util.files import atomic_write, write_json_atomic

RESUME_STATE = "last_state.pt"  # its presence is what makes a run resumable
RESUME_SLOTS = ("last-a.safetensors", "last-b.safetensors")
LEGACY_RESUME_WEIGHTS = "last.safetensors"  # run folders written before the slots
# What only resuming needs, the commit (the state) first; a completed run keeps
# best.safetensors (what using it needs).
RESUME_FILES = (RESUME_STATE, *RESUME_SLOTS, LEGACY_RESUME_WEIGHTS)

# Tests only: sleep this many seconds between a resume point's weights and its state (at
# the step in FINETUNE_TEST_CHECKPOINT_PAUSE_STEP, or at every save), after writing
# checkpoints/test-pause.json, so that a test can kill the process in that window.
PAUSE_ENV = "FINETUNE_TEST_CHECKPOINT_PAUSE_S"
PAUSE_STEP_ENV = "FINETUNE_TEST_CHECKPOINT_PAUSE_STEP"
PAUSE_MARKER = "test-pause.json"


def backbone_ref(parts: models.ModelParts, weights: str, seed: int) -> dict[str, Any]:
    """Returns the reference a head-only checkpoint keeps of the backbone it trained on."""
    digest = models.backbone_digest(parts.model.state_dict(), parts.head)
    return {"weights": weights, "seed": seed, "sha256": digest}


def save(
    path: Path,
    parts: models.ModelParts,
    model_name: str,
    ref: dict[str, Any] | None = None,
    *,
    step: int | None = None,
    merged: str | None = None,
) -> None:
    """Writes the model's weights to path atomically and fsynced: all of them, or with ref
    only the head's (the backbone is named by ref instead); step is recorded with them, and
    merged names the strategy whose added pieces were merged into these weights."""
    state = parts.model.state_dict()
    if ref is not None:
        state = {k: v for k, v in state.items() if parts.is_head(k)}
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"model": model_name}
    if ref is not None:
        metadata["backbone"] = json.dumps(ref, sort_keys=True)
    if step is not None:
        metadata["step"] = str(step)
    if merged is not None:
        metadata["merged"] = merged
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata), fsync=True)


def saved_step(path: Path) -> int | None:
    """Returns the training step a weights file was saved at, None when it does not say."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get("step")
    return int(raw) if raw is not None else None


def reference(path: Path) -> dict[str, Any] | None:
    """Returns the backbone reference of a head-only weights file, None for a whole model."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get("backbone")
    return json.loads(raw) if raw else None


def unmerged_pieces(path: Path) -> str | None:
    """Returns what a weights file holds beside torchvision's own weights: "adapters" (peft's
    layers, not merged: a run of lora, ... that has not completed), "prompts" (vpt's, which
    never merge), or None for torchvision's model as it is."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = list(f.keys())
    if any(".base_layer." in k for k in keys):
        return "adapters"
    if any(k.endswith(".vpt_prompt") for k in keys):
        return "prompts"
    return None


def save_files(folder: Path, files: dict[str, dict]) -> int:
    """Writes a strategy's own files into folder, each atomically: a .safetensors file's
    tensors, a .json file's data; returns their size in bytes (what a user keeps)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        if name.endswith(".safetensors"):
            tensors = {k: v.detach().contiguous().cpu() for k, v in content.items()}
            atomic_write(path, lambda tmp, t=tensors: save_file(t, str(tmp)), fsync=True)
        else:
            write_json_atomic(path, content)
    return sum((folder / name).stat().st_size for name in files)


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


class ResumeStateBroken(RuntimeError):
    """The resume point cannot be used as it is on disk (a missing or mismatched file)."""


def has_resume_state(ckpt_dir: Path) -> bool:
    """Returns True when checkpoints/ holds a resume point (what resuming continues from)."""
    return (Path(ckpt_dir) / RESUME_STATE).is_file()


def drop_resume_state(ckpt_dir: Path) -> None:
    """Removes the resume point (a completed run keeps only best.safetensors): its state
    first, so that a kill halfway leaves no state naming a missing weights file."""
    for name in RESUME_FILES:
        (Path(ckpt_dir) / name).unlink(missing_ok=True)


def load_resume_point(ckpt_dir: Path) -> tuple[dict[str, Any], Path]:
    """Returns the resume point: its state (loaded with weights_only=True) and the weights
    file saved with it. Raises ResumeStateBroken when they are missing or do not belong
    together."""
    ckpt_dir = Path(ckpt_dir)
    state_path = ckpt_dir / RESUME_STATE
    if not state_path.is_file():
        raise ResumeStateBroken(f"there is no resume point ({state_path} is missing)")
    state = torch.load(state_path, weights_only=True, map_location="cpu")
    name = state.get("weights", LEGACY_RESUME_WEIGHTS)
    if name not in (*RESUME_SLOTS, LEGACY_RESUME_WEIGHTS):
        raise ResumeStateBroken(f"{state_path} names {name!r}, which is not a weights slot")
    weights = ckpt_dir / name
    if not weights.is_file():
        raise ResumeStateBroken(
            f"{state_path} belongs with {name}, which is missing: the checkpoint is incomplete"
        )
    step = saved_step(weights)
    if step is not None and step != int(state["step"]):
        raise ResumeStateBroken(
            f"{weights} holds the weights of step {step} but {state_path} the state of step "
            f"{state['step']}: they do not belong together"
        )
    return state, weights


def save_resume_point(
    ckpt_dir: Path, state: dict[str, Any], write_weights: Callable[[Path], None]
) -> Path:
    """Saves a resume point as one unit; returns the weights file written.

    write_weights(path) writes the weights (fsynced) into the slot the committed state does
    not name; then the state, naming that slot, replaces last_state.pt atomically and
    fsynced. The slot and the old weights file the state no longer names go after that.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    committed = _committed_weights(ckpt_dir)
    slot = RESUME_SLOTS[1] if committed == RESUME_SLOTS[0] else RESUME_SLOTS[0]
    write_weights(ckpt_dir / slot)
    _pause_for_test(ckpt_dir, int(state["step"]))
    state = {**state, "weights": slot}
    atomic_write(ckpt_dir / RESUME_STATE, lambda tmp: torch.save(state, tmp), fsync=True)
    for name in (*RESUME_SLOTS, LEGACY_RESUME_WEIGHTS):
        if name != slot:
            (ckpt_dir / name).unlink(missing_ok=True)
    return ckpt_dir / slot


def _committed_weights(ckpt_dir: Path) -> str | None:
    """Returns the weights file name the committed state names (None: no state)."""
    path = ckpt_dir / RESUME_STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: nothing to keep, either slot will do
        return None
    return state.get("weights", LEGACY_RESUME_WEIGHTS) if isinstance(state, dict) else None


def _pause_for_test(ckpt_dir: Path, step: int) -> None:
    seconds = os.environ.get(PAUSE_ENV)
    at = os.environ.get(PAUSE_STEP_ENV)
    if not seconds or (at and int(at) != step):
        return
    write_json_atomic(ckpt_dir / PAUSE_MARKER, {"pid": os.getpid(), "step": step})
    time.sleep(float(seconds))
