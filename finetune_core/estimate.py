"""Time per step and peak memory of a config, measured with a few of the engine's own
training steps on random images.

Runs in its own process (`python -m finetune_core.estimate CONFIG_JSON NUM_CLASSES`), never
in the dashboard's server: the measurement gets the machine's cores to itself, its peak
memory is the process's own, and the server stays responsive. Prints one JSON object.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from finetune_core import data, engine, models
from finetune_core.config import from_dict
from finetune_core.device import pick_device
from finetune_core.runner import child_env

WARMUP_STEPS = 1
MEASURED_STEPS = 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(cfg_dict: dict, num_classes: int) -> dict:
    """Returns {"step_s", "peak_bytes", "device", "trainable_params", "feature_cache"} for the
    phase of the plan that trains the most parameters (the slowest one): the engine's
    train_step on random images, with random weights."""
    cfg = from_dict(cfg_dict)
    device = pick_device(cfg.device)
    base_rss = _rss_bytes()
    parts = engine.build_model(cfg, num_classes)
    gen = torch.Generator().manual_seed(0)
    n = cfg.batch_size * (WARMUP_STEPS + MEASURED_STEPS)
    size = cfg.image_size
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    split = data.TensorSplit(images, labels)
    classes = [str(i) for i in range(num_classes)]
    exp = engine.Experiment(
        cfg, parts, data.ImageData(classes, split, split), device, models.input_spec(cfg.model)
    )
    trainer = engine.Trainer(exp)
    phase = max(trainer.plan.phases, key=lambda p: p.trainable_params)
    trainer.epoch = phase.start_epoch
    trainer.enter_phase(trainer.epoch)
    loader = trainer.begin_epoch()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i, (x, y) in enumerate(loader):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        trainer.train_step(x, y, i)
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
        "feature_cache": trainer.use_feature_cache(),
    }


def run_measurement(cfg_dict: dict, num_classes: int, timeout_s: float = 300) -> dict:
    """Returns measure()'s result from a separate process; raises RuntimeError with the
    child's last error line when it fails."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_core.estimate", json.dumps(cfg_dict), str(num_classes)],
        capture_output=True,
        text=True,
        cwd=root,
        env=child_env(),
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"the measurement exited with {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def epoch_estimate(step_s: float, train_images: int, batch_size: int) -> tuple[int, float]:
    """Returns (steps per epoch, seconds per epoch) for a measured step time."""
    steps = max(1, data.steps_per_epoch(train_images, batch_size))
    return steps, steps * step_s


def data_bytes(images: int, image_size: int) -> int:
    """Returns the memory the decoded images take (uint8, 3 channels, kept in memory)."""
    return images * 3 * image_size * image_size


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]), int(sys.argv[2]))))
