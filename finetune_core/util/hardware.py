"""What this machine has, found without torch (the dashboard's Home shows it on its first
load, before anything imports torch): CPU cores, memory, NVIDIA GPUs, Apple silicon."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from functools import cache


def memory_gib() -> float | None:
    """Returns the machine's memory in GiB (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _visible(count: int) -> list[int]:
    """Returns the indices of the GPUs CUDA_VISIBLE_DEVICES lets programs use."""
    setting = os.environ.get("CUDA_VISIBLE_DEVICES")
    if setting is None:
        return list(range(count))
    wanted = []
    for part in setting.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) >= count:
            break  # CUDA stops at the first id that names no device
        wanted.append(int(part))
    return wanted


@cache
def nvidia_gpus() -> tuple[tuple[str, float], ...]:
    """Returns (name, memory in GiB) of each NVIDIA GPU programs here may use (nvidia-smi)."""
    if not (shutil.which("nvidia-smi") or os.path.isdir("/proc/driver/nvidia/gpus")):
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            gpus.append((name.strip(), float(mib) / 1024))
        except ValueError:
            continue
    return tuple(gpus[i] for i in _visible(len(gpus)))


def apple_gpu() -> bool:
    """Returns True on Apple silicon (its GPU is torch's MPS device)."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


@cache
def summary() -> str:
    """Returns what runs train on by default, for people: the GPU's name and memory, else the
    CPU's cores and the machine's memory."""
    gpus = nvidia_gpus()
    if gpus:
        name, gib = gpus[0]
        more = f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""
        return f"GPU: {name}, {gib:.0f} GiB memory{more}"
    if apple_gpu():
        return "Apple GPU (MPS)"
    cores = os.cpu_count() or 1
    mem = memory_gib()
    mem_text = f", {mem:.0f} GiB memory" if mem else ""
    return f"CPU: {cores} core{'s' if cores != 1 else ''}{mem_text} (no GPU found)"
