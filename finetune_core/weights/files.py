"""Reading weights files safely: safetensors, or .pt/.pth only through
torch.load(weights_only=True), which never runs code from the file; common wrappers
(a checkpoint dict, DataParallel's or torch.compile's prefixes) unwrapped."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from finetune_core.weights.base import SOURCES_HELP, WeightsError, first_line

FILE_SUFFIXES = (".safetensors", ".pt", ".pth")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel and torch.compile wrappers


def unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    """Returns a flat {name: tensor} state dict from a loaded object, unwrapping common forms."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(
            f"{source} does not hold a state dict (got {type(obj).__name__}); save one with "
            "torch.save(model.state_dict(), PATH) or safetensors.torch.save_file."
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"{source} is not a plain state dict: the entries {', '.join(map(str, bad[:3]))} "
            "are not tensors; save one with torch.save(model.state_dict(), PATH)."
        )
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def read_file(path: Path, *, lazy: bool = False) -> dict:
    """Returns the state dict in a weights file; lazy=True reads safetensors headers only and
    memory-maps pickles (for cheap checks). Raises WeightsError naming the file."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise WeightsError(
            f"{path} is not a weights file this tool reads: use .safetensors, .pt or .pth "
            f"(or choose default, {SOURCES_HELP})."
        )
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            if lazy:  # shapes only, as meta tensors
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    return {
                        k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()
                    }
            from safetensors.torch import load_file

            return unwrap(load_file(str(path), device="cpu"), str(path))
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(
                f"{path} is not a readable safetensors file ({first_line(e)}); "
                f"check the file, or choose default, {SOURCES_HELP}."
            ) from None
    try:
        with warnings.catch_warnings():  # torch asks to file an issue for protocol 4+ pickles
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy or None)
            except RuntimeError as e:
                if not lazy or "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:
        reason = unpickling_reason(e)
        if is_weights_only_refusal(e):
            if "operand" in reason.lower():  # a pickle opcode, e.g. of a newer protocol
                what = "pickle instructions that torch.load(weights_only=True) does not read"
                fix = "torch.save(model.state_dict(), PATH) with its default pickle protocol"
            else:
                what = "Python objects other than tensors"
                fix = "torch.save(model.state_dict(), PATH)"
            raise WeightsError(
                f"{path} was refused: the file holds {what} ({reason}). .pt/.pth files are "
                "only read with torch.load(weights_only=True), which never runs code from a "
                f"file. Save only the state dict ({fix}) or convert it to .safetensors."
            ) from None
        if isinstance(e, pickle.UnpicklingError):
            raise WeightsError(
                f"{path} is not a PyTorch weights file ({reason}); check the file, "
                f"or choose default, {SOURCES_HELP}."
            ) from None
        raise WeightsError(
            f"{path} could not be read as a PyTorch weights file ({reason}); "
            f"check the file, or choose default, {SOURCES_HELP}."
        ) from None
    return unwrap(obj, str(path))


# How torch.load(weights_only=True) starts every refusal; the rest of its message advises
# loading with weights_only=False or allow-listing the class, which must never reach a user
# of a shared server: the file is refused, full stop.
WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
TORCH_ADVICE = ("weights_only", "trust", "file an issue", "check the documentation", "safe_globals")


def is_weights_only_refusal(e: BaseException) -> bool:
    """Returns True when torch.load(weights_only=True) refused what the file holds."""
    return WEIGHTS_ONLY_REFUSAL in str(e)


def unpickling_reason(e: BaseException) -> str:
    """Returns what torch.load's error says about the file, without torch's advice
    (weights_only=False, add_safe_globals), on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch emphasises with terminal colours
    m = re.search(
        r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\n\n|$)", text, re.S
    )
    if m:
        reason = m.group(1)
    else:
        lines = [x.strip() for x in text.splitlines()]
        kept = [x for x in lines if x and not any(a in x.lower() for a in TORCH_ADVICE)]
        reason = kept[0] if kept else (first_line(e) if not is_weights_only_refusal(e) else "")
    reason = " ".join(reason.split()).rstrip(".")[:300]
    return reason or "refused by torch.load(weights_only=True)"
