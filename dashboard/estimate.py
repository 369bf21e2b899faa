"""Time per step and peak memory of a config, measured with a few real training steps.

Runs in its own process (`python -m dashboard.estimate CONFIG_JSON NUM_CLASSES`), never in
the Streamlit server: the measurement gets the machine's cores to itself, its peak memory
is the process's own, and the server stays responsive. Prints one JSON object.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

WARMUP_STEPS = 1
MEASURED_STEPS = 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(cfg_dict: dict, num_classes: int) -> dict:
    """Returns {"step_s", "peak_bytes", "device", "trainable_params"} for the phase of the
    plan that trains the most parameters (the slowest one), random weights and images."""
    import torch

    from finetune_core import engine, models, strategies
    from finetune_core.config import from_dict

    cfg = from_dict({k: v for k, v in cfg_dict.items() if k != "env"})
    device = engine.pick_device(cfg.device)
    amp_dtype, channels_last = engine.speed_settings(device)  # as the run will train
    base_rss = _rss_bytes()
    parts = models.create_model(cfg.model, num_classes, image_size=cfg.image_size, device=device)
    if channels_last:
        parts.model.to(memory_format=torch.channels_last)
    plan = strategies.make_plan(cfg, parts)
    phase = max(plan.phases, key=lambda p: p.trainable_params)
    strategies.apply_phase(parts, phase, bitfit=cfg.strategy == "bitfit")
    strategies.set_train_mode(parts, phase, freeze_bn=cfg.freeze_bn)
    opt = engine.make_optimizer(cfg, strategies.optimizer_groups(cfg, parts, plan))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (cfg.batch_size,), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for i in range(WARMUP_STEPS + MEASURED_STEPS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(parts.model(x), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = max(0, peak_rss - base_rss)
    return {
        "step_s": sorted(times)[len(times) // 2],
        "peak_bytes": int(peak),
        "device": str(device),
        "trainable_params": int(phase.trainable_params),
    }


def run_measurement(cfg_dict: dict, num_classes: int, timeout_s: float = 300) -> dict:
    """Returns measure()'s result from a separate process; raises RuntimeError with the
    child's last error line when it fails."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "dashboard.estimate", json.dumps(cfg_dict), str(num_classes)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"the measurement exited with {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def epoch_estimate(step_s: float, train_images: int, batch_size: int) -> tuple[int, float]:
    """Returns (steps per epoch, seconds per epoch) for a measured step time."""
    steps = max(1, math.ceil(train_images / batch_size))
    return steps, steps * step_s


def data_bytes(images: int, image_size: int) -> int:
    """Returns the memory the decoded images take (uint8, 3 channels, kept in memory)."""
    return images * 3 * image_size * image_size


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]), int(sys.argv[2]))))
