"""torchvision's ImageNet weights: its weights enum, its download into the torch hub cache
(get_state_dict(check_hash=True, weights_only=True)), and what to do when that fails."""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision

from finetune_core.weights.base import SOURCES_HELP, WeightsError, first_line
from finetune_core.weights.files import unpickling_reason, unwrap

NETWORK_TIMEOUT_S = 10.0


def tv_weights(model: str):
    """Returns torchvision's DEFAULT weights enum entry for model; raises WeightsError."""
    try:
        return torchvision.models.get_model_weights(model).DEFAULT
    except Exception:
        raise WeightsError(
            f"torchvision has no pretrained weights for {model!r}; choose {SOURCES_HELP}."
        ) from None


def hub_checkpoints() -> Path:
    """Returns the torch hub's checkpoints folder ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def file_mib(w) -> float | None:
    """Returns the size of a weights file in MiB from torchvision's meta, or None."""
    size = w.meta.get("_file_size")
    return float(size) if size else None


def _network_problem(url: str) -> str | None:
    """Returns why url's host cannot be reached (bounded wait), or None when it may be.

    torch.hub's download has no timeout; without this a machine whose firewall drops
    packets would hang for minutes before saying it is offline.
    """
    if any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return None  # the proxy decides; let urllib try
    parts = urlparse(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    result: dict[str, BaseException] = {}

    def probe():
        try:
            socket.create_connection((host, port), timeout=NETWORK_TIMEOUT_S).close()
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(NETWORK_TIMEOUT_S + 1)
    if thread.is_alive():
        return f"no answer from {host} within {NETWORK_TIMEOUT_S:.0f} s"
    if "error" in result:
        return f"cannot reach {host}: {first_line(result['error'])}"
    return None


def _offline_message(model: str, w, target: Path, reason: str) -> str:
    return (
        f"could not download the ImageNet weights for {model} ({reason}; no network?). "
        f"To use them offline, download {w.url} on another machine and put it at {target} "
        f"(folder {target.parent}, file name {target.name}; TORCH_HOME moves the folder). "
        f"Or choose other weights: {SOURCES_HELP}."
    )


@contextlib.contextmanager
def _watch_download(target: Path, total_bytes: float | None, progress):
    """Reports the growing `<target>.*.partial` file torch.hub downloads into as progress."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def watch():
        while not stop.wait(0.5):
            partial = list(target.parent.glob(target.name + ".*.partial"))
            if not partial:
                continue
            with contextlib.suppress(OSError):
                done = max(p.stat().st_size for p in partial)
                frac = min(done / total_bytes, 1.0) if total_bytes else None
                progress("weights", frac, f"downloading {target.name}: {done / 2**20:.1f} MB")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(2)


def cache_path(model: str) -> Path:
    """Returns the file torchvision downloads `model`'s default weights to."""
    return hub_checkpoints() / os.path.basename(urlparse(tv_weights(model).url).path)


def load_default(model: str, progress) -> dict[str, torch.Tensor]:
    """Returns torchvision's state dict for model, downloading it into the hub cache first."""
    w = tv_weights(model)
    target = cache_path(model)
    if not target.exists():
        reason = _network_problem(w.url)
        if reason:
            raise WeightsError(_offline_message(model, w, target, reason))
        mib = file_mib(w)
        if progress:
            size = f"{mib:.1f} MB " if mib else ""
            progress("weights", 0.0, f"downloading {size}ImageNet weights for {model} to {target}")
        try:
            with _watch_download(target, mib * 2**20 if mib else None, progress):
                state = w.get_state_dict(
                    progress=progress is None, check_hash=True, weights_only=True
                )
        except Exception as e:
            if target.exists():  # downloaded, then unreadable
                raise WeightsError(_unreadable_cache(model, target, e)) from None
            if isinstance(e, RuntimeError) and "hash" in str(e):
                raise WeightsError(
                    f"the downloaded ImageNet weights for {model} were corrupt ({first_line(e)}); "
                    f"try again, or put {w.url} at {target} yourself, or choose {SOURCES_HELP}."
                ) from None
            raise WeightsError(_offline_message(model, w, target, first_line(e))) from None
        if progress:
            progress("weights", 1.0, f"ImageNet weights for {model} downloaded to {target}")
        return unwrap(state, str(target))
    try:
        state = w.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:
        raise WeightsError(_unreadable_cache(model, target, e)) from None
    return unwrap(state, str(target))


def _unreadable_cache(model: str, target: Path, e: BaseException) -> str:
    reason = unpickling_reason(e) if isinstance(e, pickle.UnpicklingError) else first_line(e)
    return (
        f"the cached ImageNet weights for {model} at {target} cannot be read ({reason}); "
        f"delete that file to download it again, or choose other weights: {SOURCES_HELP}."
    )
