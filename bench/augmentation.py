"""Measures each augmentation on the engine's decoded uint8 batches: images/s of the input
pipeline alone (TensorLoader -> augment_batch on the device -> normalise, plus random
erasing or MixUp/CutMix where named), against today's flip, and what share of a training
step's time it adds (the step measured as New run's estimate measures it: ResNet-18, full,
augment none).

    PYTHONPATH=. .venv/bin/python bench/augmentation.py [--device cpu] [--size 64]
        [--batch 64] [--seconds 2] [--rounds 3] [--model resnet18] [--json FILE]

Rows: none, flip (the default), crop, fastai, trivialaugment, randaugment, augmix (each
with the mirror), crop without the mirror, random erasing (p 0.25, on flip), MixUp 0.2 and
CutMix 1.0 (on flip). Nothing is written but --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from finetune_core import data, estimate, models, recipe
from finetune_core.config import RunConfig
from finetune_core.device import pick_device

ROWS = {  # row -> (augment, the mirror, random_erase, mixup_alpha, cutmix_alpha)
    "none": ("none", True, 0.0, 0.0, 0.0),
    "flip (default)": ("flip", True, 0.0, 0.0, 0.0),
    "crop": ("crop", True, 0.0, 0.0, 0.0),
    "crop, no mirror": ("crop", False, 0.0, 0.0, 0.0),
    "fastai": ("fastai", True, 0.0, 0.0, 0.0),
    "trivialaugment": ("trivialaugment", True, 0.0, 0.0, 0.0),
    "randaugment": ("randaugment", True, 0.0, 0.0, 0.0),
    "augmix": ("augmix", True, 0.0, 0.0, 0.0),
    "flip + random erasing 0.25": ("flip", True, 0.25, 0.0, 0.0),
    "flip + MixUp 0.2 / CutMix 1.0": ("flip", True, 0.0, 0.2, 1.0),
}


def pipeline_rate(row, images, labels, device, batch, seconds) -> float:
    """Returns images/s of the input pipeline of a row over the images, epoch after epoch
    (each batch's generator seeded as the engine seeds it), until `seconds` have passed,
    after one untimed batch (first calls build transforms and warm caches)."""
    augment, mirror, erase, mixup, cutmix = ROWS[row]
    cfg = RunConfig(mixup_alpha=mixup, cutmix_alpha=cutmix)
    mixer = recipe.mixer_for(cfg, int(labels.max()) + 1)
    spec = models.input_spec("resnet18")
    loader = data.TensorLoader(
        data.TensorSplit(images, labels), batch, shuffle=True, drop_last=True
    )
    done, epoch, t0 = 0, 0, None
    while True:
        epoch += 1
        loader.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if t0 is None and i == 1:  # the first batch warmed up
                done, t0 = 0, time.perf_counter()
            g = torch.Generator(device=device).manual_seed(epoch * 10_007 + i)
            x, y = x.to(device), y.to(device)
            if augment != "none":
                x = data.augment_batch(x, augment, g, flip=mirror)
            x = data.normalize(x, spec.mean, spec.std)
            if erase:
                x = data.augment.random_erase(x, erase, g)
            if mixer is not None:
                x, _ = mixer(x, y, g)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done += len(x)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done / elapsed


def training_rate(model: str, size: int, batch: int, device: torch.device) -> float:
    """Returns the images/s of the engine's training step (full, augment none) on this
    device, as New run's estimate measures it."""
    cfg = RunConfig(
        model=model, weights="none", image_size=size, batch_size=batch, augment="none",
        device=device.type,
    )  # fmt: skip
    measured = estimate.measure(cfg.to_dict(), 10)
    return batch / measured["step_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=2.0, help="per row and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = pick_device(args.device)
    gen = torch.Generator().manual_seed(0)
    n = max(8 * args.batch, 512)
    images = torch.randint(0, 256, (n, 3, args.size, args.size), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=gen)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device: {device} | {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"CPUs, {torch.get_num_threads()} torch threads, load {load:.1f} | torch "
        f"{torch.__version__} | {args.size} px, batch {args.batch}",
        flush=True,
    )
    train = training_rate(args.model, args.size, args.batch, device)
    print(f"{args.model} training step (full, augment none): {train:.0f} img/s\n", flush=True)
    # rounds over every row, each row's best round kept: a shared machine's load drifts
    rates = dict.fromkeys(ROWS, 0.0)
    for _ in range(args.rounds):
        for row in ROWS:
            rate = pipeline_rate(row, images, labels, device, args.batch, args.seconds)
            rates[row] = max(rates[row], rate)
    flip = rates["flip (default)"]
    print("| augmentation | pipeline img/s | x flip | added to a training step |")
    print("|---|---|---|---|")
    results = []
    for row, rate in rates.items():
        added = train / rate  # the pipeline's seconds per image over the step's
        print(f"| {row} | {rate:,.0f} | {rate / flip:.2f} | {added:.1%} |")
        results.append({"row": row, "img_s": rate, "x_flip": rate / flip, "step_share": added})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "train_img_s": train, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
