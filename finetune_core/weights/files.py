"""Reading weights files safely: safetensors, or .pt/.pth only through
torch.load(weights_only=True), which never runs code from the file; common wrappers
(a checkpoint dict, DataParallel's or torch.compile's prefixes) unwrapped."""

from __future__ import annotations

import pickle
import re
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
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy or None)
        except RuntimeError as e:
            if not lazy or "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as e:
        reason = unpickling_reason(e)
        if "global" in reason.lower():
            raise WeightsError(
                f"{path} was refused: it holds Python objects other than tensors ({reason}), and "
                ".pt/.pth files are only loaded with torch.load(weights_only=True), which never "
                "runs code from the file. Save only the state dict "
                "(torch.save(model.state_dict(), PATH)) or convert it to .safetensors."
            ) from None
        raise WeightsError(
            f"{path} is not a PyTorch weights file ({reason}); check the file, "
            f"or choose default, {SOURCES_HELP}."
        ) from None
    except Exception as e:
        raise WeightsError(
            f"{path} could not be read as a PyTorch weights file ({first_line(e)}); "
            f"check the file, or choose default, {SOURCES_HELP}."
        ) from None
    return unwrap(obj, str(path))


def unpickling_reason(e: BaseException) -> str:
    """Returns the useful part of torch.load(weights_only=True)'s long refusal message."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\n|$)", str(e))
    return m.group(1).strip() if m else first_line(e)
