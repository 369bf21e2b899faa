"""What a run costs: the peak memory of a training step, measured with real tensors (and
checked against torch.profiler's record of every allocation), and the stored size of what a
run must keep."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from finetune_core import data, engine, estimate, models, strategies
from finetune_core.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
THREE = {
    "linear_probe": {"strategy": "linear_probe"},
    "last_n 1": {"strategy": "last_n", "unfreeze_last": 1},
    "full": {"strategy": "full"},
}


def _config(**kw) -> RunConfig:
    base = dict(model="resnet18", data="builtin:shapes", weights="none", image_size=32)
    return RunConfig(**{**base, "batch_size": 4, **kw})


def _trainer(cfg: RunConfig, num_classes: int = 6) -> engine.Trainer:
    """Returns a Trainer on random images (two batches), as the estimate builds one."""
    g = torch.Generator().manual_seed(0)
    n, size = 2 * cfg.batch_size, cfg.image_size
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    split = data.TensorSplit(images, torch.randint(0, num_classes, (n,), generator=g))
    classes = [str(i) for i in range(num_classes)]
    exp = engine.Experiment(
        cfg,
        engine.build_model(cfg, num_classes),
        data.ImageData(classes, split, split),
        torch.device("cpu"),
        models.input_spec(cfg.model),
    )
    trainer = engine.Trainer(exp)
    trainer.enter_phase(1)
    return trainer


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_the_measured_memory_orders_linear_probe_below_last_n_below_full():
    measured = {name: estimate.measure(_config(**kw).to_dict(), 6) for name, kw in THREE.items()}
    peaks = [measured[name]["peak_bytes"] for name in THREE]
    assert peaks[0] < peaks[1] < peaks[2], peaks
    for m in measured.values():
        assert m["memory_measure"] == (
            "cpu: saved for backward + parameters + gradients + optimizer state"
        )
        parts = m["memory_breakdown"]
        assert sum(parts.values()) == m["peak_bytes"]  # on the CPU the parts are the figure
        assert parts["parameters"] == _bytes(models.create_model("resnet18", 6).model.parameters())
    # gradients and optimizer state are the difference: none for the frozen backbone
    probe, last, full = (measured[name]["memory_breakdown"] for name in THREE)
    assert probe["gradients"] < last["gradients"] < full["gradients"]
    assert probe["saved_for_backward"] < last["saved_for_backward"] < full["saved_for_backward"]


def _allocation_peak(prof) -> int:
    """Returns the peak, over the profiled time, of the bytes allocated minus those freed
    (the profiler's own record of every CPU allocation, in time order)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    now = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        now += e.nbytes()
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("name", list(THREE))
def test_the_measured_memory_agrees_with_the_profilers_allocations_of_the_same_step(name):
    # Independent: the profiler sees the allocator itself (every allocation and free, with
    # its time), where the measure counts tensors it finds (saved-tensor hooks, the model's
    # parameters, the gradients, the optimizer's state). What existed before the step (the
    # model's state) is added to the profiler's peak, which counts only new allocations.
    trainer = _trainer(_config(**THREE[name]))
    inputs, labels = next(iter(trainer.begin_epoch()))
    before = _bytes(trainer.parts.model.state_dict().values())
    # an earlier test's trainer freed by the collector during the step would show as frees
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.measured_step(inputs, labels, 0)
    finally:
        gc.enable()
    measured = trainer.peak_memory.total
    profiled = before + _allocation_peak(prof)
    assert abs(measured - profiled) <= 0.25 * profiled, (name, measured, profiled)


def _image_folder(root: Path, classes: int = 3, per_class: int = 20) -> Path:
    """Writes a small folder of PNGs (one subfolder per class, each its own colour)."""
    g = torch.Generator().manual_seed(0)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            tint = torch.tensor([80 * k, 255 - 80 * k, 120]).view(3, 1, 1)
            noise = torch.randint(0, 60, (3, 32, 32), generator=g)
            pixels = (tint + noise).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(root / f"c{k}" / f"{i:02d}.png")
    return root


def test_a_training_run_writes_its_peak_memory_and_stored_size(tmp_path):
    # gradual: a linear probe for epoch 1, then the top group too: the peak grows
    folder = _image_folder(tmp_path / "images")
    args = ["--data", str(folder), "--weights", "none", "--image-size", "32", "--epochs", "2"]
    args += ["--strategy", "gradual", "--batch-size", "16", "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_core", "train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["peak_memory_bytes"] for r in records if r["split"] == "val"]
    assert len(val) == 2 and 0 < val[0] < val[1]  # the peak so far, larger once layer4 trains
    assert summary["peak_memory_bytes"] == val[-1]
    assert summary["memory_measure"].startswith("cpu: saved for backward")
    # what gradual trains in some phase: layer4 (its BatchNorm statistics too) and the head
    model = models.create_model("resnet18", 3).model
    expected = _bytes(model.layer4.state_dict().values()) + _bytes(model.fc.state_dict().values())
    assert summary["stored_bytes"] == expected


def _stored(**kw) -> int:
    from finetune_core import memory

    cfg = _config(**kw)
    parts = engine.build_model(cfg, 6)
    return memory.stored_bytes(parts, strategies.make_plan(cfg, parts), freeze_bn=cfg.freeze_bn)


def test_the_stored_size_is_what_training_changes_and_the_head_alone_for_a_probe():
    model = models.create_model("resnet18", 6).model
    head = _bytes(model.fc.state_dict().values())
    layer4 = model.layer4.state_dict()
    stored = {name: _stored(**kw) for name, kw in THREE.items()}
    assert stored["linear_probe"] == head
    assert stored["last_n 1"] == head + _bytes(layer4.values())
    assert stored["full"] == _bytes(model.state_dict().values())
    assert stored["linear_probe"] < stored["last_n 1"] < stored["full"]
    # frozen BatchNorm statistics do not change: last_n 1 keeps layer4's weights only
    weights_only = [v for k, v in layer4.items() if "running" not in k and "num_batches" not in k]
    assert _stored(**THREE["last_n 1"], freeze_bn=True) == head + _bytes(weights_only)
