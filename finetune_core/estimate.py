"""Time per step and peak memory of a config, measured with a few of the engine's own
training steps on random images; the memory as training measures it (memory.py), on the
first step, which creates the optimizer state.

Runs in its own process, never in the dashboard's server: as a background job (`run_job`,
see jobs.py; the New run page starts one for all the configs of a comparison), or alone as
`python -m finetune_core.estimate CONFIG_JSON NUM_CLASSES`, which prints one JSON object.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import torch

from finetune_core import data, engine, models
from finetune_core.config import from_dict
from finetune_core.device import pick_device

WARMUP_STEPS = 1
MEASURED_STEPS = 4


def measure(cfg_dict: dict, num_classes: int, tick=None) -> dict:
    """Returns the engine's train_step on random images for the phase of the plan that trains
    the most parameters (the slowest one), with random weights: {"step_s" (median),
    "step_s_min", "step_s_max" (the spread of the measured steps), "peak_bytes" (the first
    step's memory, measured as training measures its peak_memory_bytes: engine.Trainer.
    measured_step; a linear probe here runs its backbone without a feature cache), "memory_measure" (its method), "memory_breakdown" (bytes per
    part), "device", "trainable_params", "feature_cache"}. tick() is called before every
    step (a job's cancel check)."""
    cfg = from_dict(cfg_dict)
    device = pick_device(cfg.device)
    gc.collect()  # the previous config's model and optimizer, gone before this one's
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
    times = []
    for i, (x, y) in enumerate(loader):
        if tick is not None:
            tick()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if i == 0:  # the step that creates the optimizer state: the one whose memory counts
            trainer.measured_step(x, y, i)
        else:
            trainer.train_step(x, y, i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    peak = trainer.peak_memory
    result = {
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "peak_bytes": int(peak.total),
        "memory_measure": peak.method,
        "memory_breakdown": dict(peak.breakdown),
        "device": str(device),
        "trainable_params": int(phase.trainable_params),
        "feature_cache": trainer.use_feature_cache(),
    }
    del trainer, exp, parts, images, loader, split
    gc.collect()
    return result


def run_job(args: dict, progress) -> dict:
    """The estimate job: measures each config of args["configs"] ({label: config dict}) for
    args["num_classes"] classes, one after the other in this process; returns {label:
    measure()'s result}. progress(fraction, message) reports; progress() only checks for
    a cancel."""
    configs = args["configs"]
    out = {}
    for i, (label, cfg) in enumerate(configs.items()):
        progress(i / len(configs), f"measuring {label} ({i + 1} of {len(configs)})")
        out[label] = measure(cfg, int(args["num_classes"]), tick=progress)
    return out


def epoch_estimate(step_s: float, train_images: int, batch_size: int) -> tuple[int, float]:
    """Returns (steps per epoch, seconds per epoch) for a measured step time."""
    steps = max(1, data.steps_per_epoch(train_images, batch_size))
    return steps, steps * step_s


def data_bytes(images: int, image_size: int) -> int:
    """Returns the memory the decoded images take (uint8, 3 channels, kept in memory)."""
    return images * 3 * image_size * image_size


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]), int(sys.argv[2]))))
