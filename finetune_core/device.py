"""The device a run trains on: picking it, the speed settings the engine uses there, and its
name in config.json's "env" (the dashboard's device line, which must not wait for torch, is
util/hardware.py's).

Asks CUDA about the GPU only when CUDA is available, so that describing a machine without
a GPU never initialises CUDA.
"""

from __future__ import annotations

import os
import platform
import time
from functools import lru_cache

import torch
import torchvision


class DeviceError(RuntimeError):
    """The device asked for is not there; the message says what to choose instead."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(name: str = "auto") -> torch.device:
    """Returns the torch device for "auto" (cuda, then mps, then cpu) or an explicit name."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    problem = check(name)
    if problem:
        raise DeviceError(problem)
    return torch.device(name)


def available() -> list[str]:
    """Returns the device names this machine has: cpu, and cuda and mps when they are there."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if _mps_available():
        found.append("mps")
    return found


def check(name: str) -> str | None:
    """Returns why device `name` cannot be used on this machine (naming the ones it has), or
    None. Asks CUDA only whether it is there: nothing is initialised."""
    if name == "auto" or name in available():
        return None
    what = {"cuda": "no CUDA GPU is available", "mps": "Apple's MPS is not available"}.get(
        name, f"{name!r} is not a device this tool uses"
    )
    here = ", ".join(["auto", *available()])
    return f"device {name} was asked for but {what} on this machine; devices here: {here}"


def speed_settings(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Returns (autocast dtype or None for fp32, channels_last) the engine trains with.

    CUDA: bf16 autocast (fp16 with a GradScaler where bf16 is missing). channels_last on CUDA
    and CPU: faster convolutions there (bench/run.py on a 2-core AMD EPYC: ResNet-18 full
    training 1.11-1.17x the NCHW loop instead of 0.97x); MPS stays NCHW, fp32.
    """
    amp = None
    if device.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return amp, device.type in ("cuda", "cpu")


@lru_cache(maxsize=8)
def name(device: str = "auto") -> str:
    """Returns a short name of the device a run with `device` uses (config.json's env)."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if device in ("auto", "mps") and _mps_available():
        return "Apple MPS"
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def environment(device: str = "auto") -> dict[str, str]:
    """Returns torch, torchvision and Python versions and the device name."""
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": name(device),
    }


_CPU_GFLOPS: float | None = None


def cpu_gflops() -> float:
    """Returns this CPU's fp32 matmul rate in GFLOP/s: the best of short bursts with pauses
    between them (so that load from other processes does not count), measured once (~0.25 s)."""
    global _CPU_GFLOPS
    if _CPU_GFLOPS is None:
        a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))  # not the global RNG
        a @ a
        best = 0.0
        for _ in range(15):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.01:
                a @ a
                n += 1
            best = max(best, 2 * 256**3 * n / (time.perf_counter() - t0) / 1e9)
            time.sleep(0.005)
        _CPU_GFLOPS = best
    return _CPU_GFLOPS
