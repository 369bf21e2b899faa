"""The learning-rate finder: an exponential sweep that stops when the loss diverges, a
suggestion below the divergence that repeats for a seed, the job kind, and `lr-find` on the
command line (train's flags, the suggestion last, the CSV, no run folder)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_core import engine, worker
from finetune_core.config import from_dict
from finetune_core.lr_find import find_lr, loss_fell, lr_at, smooth, suggest

REPO = Path(__file__).resolve().parent.parent
TINY = {
    "data": "builtin:shapes",
    "model": "resnet18",
    "weights": "none",
    "image_size": 32,
    "batch_size": 16,
    "augment": "none",
    "seed": 3,
}
STEPS = 30
START = 1e-5  # 30 steps from 1e-5 to 10: ~0.2 decades a step


def _cfg(**changes):
    return from_dict({**TINY, **changes})


def test_the_sweep_grows_exponentially_and_the_smoothing_is_bias_corrected():
    lrs = [lr_at(i, 5, 1e-4, 1.0) for i in range(5)]
    assert lrs[0] == 1e-4 and math.isclose(lrs[-1], 1.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert all(math.isclose(r, 10.0) for r in ratios)
    # a constant loss stays constant: the bias correction removes the pull towards 0
    assert all(math.isclose(s, 2.0) for s in smooth([2.0] * 20))


def test_the_suggestion_is_the_steepest_fall_below_the_minimum_and_a_flat_curve_is_said():
    lrs = [10.0**e for e in range(-6, 2)]  # 1e-6 ... 10
    smoothed = [2.0, 2.0, 1.9, 1.5, 1.3, 1.2, 3.0, 9.0]  # steepest at 1e-3, lowest at 1e-1
    suggested, lowest = suggest(lrs, smoothed)
    assert (suggested, lowest) == (1e-3, 1e-1)
    assert loss_fell(smoothed)
    assert not loss_fell([2.0, 1.95, 1.9, 1.92, 2.5, 9.0])  # 5 % is noise, not learning


def test_the_range_test_sweeps_increasing_lrs_and_stops_when_the_loss_diverges():
    curve = find_lr(_cfg(strategy="linear_probe"), steps=STEPS, start_lr=START)
    assert curve.lrs[0] == pytest.approx(START)
    assert all(b > a for a, b in zip(curve.lrs, curve.lrs[1:], strict=False))
    assert len(curve.lrs) == len(curve.losses) == len(curve.smoothed)
    assert curve.stopped_early and len(curve.lrs) < STEPS  # lr 10 blows the loss up
    assert curve.smoothed[-1] > 4.0 * min(curve.smoothed)
    assert all(math.isfinite(v) for v in curve.losses)
    assert not curve.loss_fell  # random features: no lr teaches the head much


def test_the_suggestion_lies_below_the_divergence_and_repeats_for_a_seed():
    cfg = _cfg(strategy="linear_probe", optimizer="adamw")
    first = find_lr(cfg, steps=STEPS, start_lr=START)
    second = find_lr(cfg, steps=STEPS, start_lr=START)
    assert first == second  # every lr, loss and suggestion
    assert START < first.suggested_lr < first.lrs[-1]
    assert first.suggested_lr <= first.min_loss_lr
    assert first.min_loss_lr_over_10 == pytest.approx(first.min_loss_lr / 10)


def test_a_linear_probe_stands_a_higher_lr_than_full_fine_tuning():
    """The head alone diverges at a higher lr than the whole network (on random features at
    32 px the loss barely falls before it diverges, so the suggestions are alike; where the
    curve diverges is what tells the two apart at these sizes)."""
    full = find_lr(_cfg(strategy="full"), steps=STEPS, start_lr=START)
    probe = find_lr(_cfg(strategy="linear_probe"), steps=STEPS, start_lr=START)
    print(
        f"full: suggested {full.suggested_lr:.3g}, diverged at {full.lrs[-1]:.3g}; "
        f"linear_probe: suggested {probe.suggested_lr:.3g}, diverged at {probe.lrs[-1]:.3g}"
    )
    assert full.stopped_early and probe.stopped_early
    assert probe.lrs[-1] > 2 * full.lrs[-1]


def test_every_group_keeps_its_layer_decay_ratio_to_the_swept_head_lr(monkeypatch):
    seen = []
    step = engine.Trainer.train_step

    def watched(self, inputs, labels, batch_index):
        seen.append({g["name"]: g["lr"] for g in self.optimizer.param_groups})
        return step(self, inputs, labels, batch_index)

    monkeypatch.setattr(engine.Trainer, "train_step", watched)
    cfg = _cfg(strategy="full", layer_decay=0.5, warmup_epochs=1)  # warmup must not apply
    curve = find_lr(cfg, steps=4, start_lr=1e-3, end_lr=1.0)
    assert curve.lrs == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])
    for lrs, swept in zip(seen, curve.lrs, strict=True):
        assert lrs["head"] == pytest.approx(swept)
        assert lrs["layer4"] == pytest.approx(swept / 2)
        assert lrs["layer3"] == pytest.approx(swept / 4)


def test_the_lr_find_job_returns_the_curve_as_json_and_a_progress_error_cancels_it():
    args = {"config": {**TINY, "strategy": "linear_probe"}, "steps": 6}
    seen = []
    result = worker.JOB_KINDS["lr_find"](args, lambda f, m: seen.append((f, m)))
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert len(result["lrs"]) == 6 and result["suggested_lr"] > 0
    assert any(f is not None and m for f, m in seen)

    class Cancel(Exception):
        pass

    def cancel(fraction, message):
        if fraction is not None and fraction > 0:
            raise Cancel

    with pytest.raises(Cancel):
        worker.JOB_KINDS["lr_find"](args, cancel)


def _lr_find(*args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "finetune_core", "lr-find", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )


FLAGS = [
    "--data",
    "builtin:shapes",
    "--weights",
    "none",
    "--image-size",
    "32",
    "--batch-size",
    "16",
    "--augment",
    "none",
    "--strategy",
    "linear_probe",
]


def test_lr_find_prints_the_suggestion_last_writes_the_csv_and_makes_no_run(tmp_path):
    runs = tmp_path / "runs"
    out = tmp_path / "curve.csv"
    done = _lr_find(
        *FLAGS, "--steps", "20", "--csv", str(out), "--runs-dir", str(runs), tmp_path=tmp_path
    )
    assert done.returncode == 0, done.stderr
    suggested = float(done.stdout.strip().splitlines()[-1])
    assert 1e-7 < suggested < 10
    assert "suggested lr" in done.stderr
    assert "the loss barely fell" in done.stderr  # random features: the curve is flat
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["lr", "loss", "smoothed_loss"]
    assert 2 <= len(rows) <= 20
    assert all(float(b["lr"]) > float(a["lr"]) for a, b in zip(rows, rows[1:], strict=False))
    assert not runs.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.csv"]


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--steps", "1"], "--steps"),
        (["--steps", "many"], "--steps"),
        (["--lr", "-1"], "--lr"),
        (["--strategy", "ful"], "--strategy"),
        (["--csv", "no/such/folder/curve.csv"], "--csv"),
    ],
)
def test_lr_find_refuses_a_bad_flag_with_exit_2_naming_it(tmp_path, args, flag):
    runs = tmp_path / "runs"
    done = _lr_find(*FLAGS, *args, "--runs-dir", str(runs), tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"error: {flag}:" in done.stderr
    assert done.stdout == ""
    assert not runs.exists()
