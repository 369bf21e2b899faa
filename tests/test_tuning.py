"""The lr search a comparison runs per strategy before training (tuning.py, the worker's
tuned runs, sweep's defaults): it must pick a rate as good as a grid's best, never touch
the test split, write what it chose and survive a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from finetune_core import cli, engine, lr_find, store, tuning
from finetune_core.config import RunConfig, comparison_fields, from_dict
from finetune_core.data import TensorSplit

REPO = Path(__file__).resolve().parent.parent
# a linear probe over one epoch on (cheaply pretrained) builtin weights: at its default lr
# (0.01) it learns little
PROBE = ["--data", "builtin:shapes", "--weights", "builtin", "--image-size", "32", "--epochs", "1"]
PROBE += ["--strategy", "linear_probe", "--augment", "none"]


def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "finetune_core", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=timeout,
    )


def test_the_default_comparison_tunes_the_probe_to_within_3_points_of_a_5_value_grid(tmp_path):
    runs = tmp_path / "runs"
    proc = _cli("sweep", *PROBE[:-4], "--strategies", "linear_probe", "--augment", "none",
                "--runs-dir", str(runs))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tunes its learning rate" in proc.stderr
    (run_dir,) = [p for p in runs.iterdir() if (p / "config.json").is_file()]
    config = store.read_config(run_dir)
    found = store.read_tuning(run_dir)
    assert config["tune_lr"] is True and config["lr"] == found["chosen_lr"] != 0.01
    assert config["test_fraction"] == 0.2 and config["split_seed"] == 0  # held out, one split
    tuned = store.read_summary(run_dir)["test_acc"]

    # the same probe at each lr of a 5-value grid, every setting else the sweep's own
    grid = {}
    for lr in (0.001, 0.01, 0.1, 1.0, 3.0):
        cfg = from_dict({**config, "lr": lr, "tune_lr": False, "group": None})
        grid[lr] = engine.fit(engine.prepare(cfg))["test_acc"]
    best = max(grid.values())
    assert grid[0.01] < best - 0.05, grid  # the shared default lr is far below the best
    assert tuned >= best - 0.03, (tuned, grid, found["trials"])


def test_a_tuned_run_writes_its_trials_and_a_resume_does_not_search_again(tmp_path):
    runs = tmp_path / "runs"
    proc = _cli("train", *PROBE, "--tune-lr", "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = [p for p in runs.iterdir() if (p / "config.json").is_file()]
    found = json.loads((run_dir / "lr_tuning.json").read_text())
    assert found["method"] == "val-search" and found["original_lr"] == 0.01
    assert len(found["trials"]) >= tuning.CANDIDATES
    assert found["chosen_lr"] in [t["lr"] for t in found["trials"]]
    assert all(t["lr"] < found["blowup_lr"] * 1.01 for t in found["trials"])
    assert store.read_config(run_dir)["lr"] == found["chosen_lr"]
    log = (run_dir / "worker.log").read_text()
    assert "tuned lr" in log
    # the run trained at the chosen rate: its best val accuracy is the winning trial's
    winner = next(t for t in found["trials"] if t["lr"] == found["chosen_lr"])
    assert abs(store.read_summary(run_dir)["best_val_acc"] - winner["val_acc"]) < 1e-6

    # a run whose search is written (a crash after it) trains at that rate, no new search
    found["chosen_lr"] = 0.05
    (run_dir / "lr_tuning.json").write_text(json.dumps(found))
    status = store.read_status(run_dir)
    status.update(state="queued")
    (run_dir / "status.json").write_text(json.dumps(status))
    proc = _cli("worker", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert store.read_config(run_dir)["lr"] == 0.05
    assert (run_dir / "worker.log").read_text().count("tuning the learning rate") == 1


def test_the_search_tops_out_below_where_the_loss_blew_up_and_spaces_half_decades():
    curve = lr_find.LrCurve(
        lrs=[0.001, 0.01, 0.1, 1.0],
        losses=[2.0, 1.9, 3.5, 4.5],  # above 2x the first loss only at lr 1
        smoothed=[2.0, 1.95, 2.4, 3.0],
        suggested_lr=0.01,
        min_loss_lr=0.01,
        min_loss_lr_over_10=0.001,
        stopped_early=True,
        loss_fell=False,
    )
    assert tuning.blowup_lr(curve) == 1.0
    assert tuning.candidates_around(1.0, 3) == [0.0316, 0.1, 0.316]
    assert tuning.candidates_around(1e-5, 3)[0] >= 1e-7  # within RunConfig's lr range


def test_a_trial_trains_on_a_share_of_every_class():
    labels = torch.tensor([0] * 80 + [1] * 20)
    split = TensorSplit(torch.zeros(100, 3, 4, 4, dtype=torch.uint8), labels)
    part = tuning.trial_split(split, 0.5, seed=0, batch_size=8)
    assert len(part) == 50 and int((part.labels == 1).sum()) == 10
    assert tuning.trial_split(split, 1.0, seed=0, batch_size=8) is split


def test_a_comparison_shares_one_split_and_holds_out_test_only_when_tuned():
    base = RunConfig(seed=3)
    assert comparison_fields(base, tune=True) == {
        "tune_lr": True,
        "split_seed": 3,
        "test_fraction": 0.2,
    }
    assert comparison_fields(base, tune=False) == {"tune_lr": False, "split_seed": 3}
    kept = RunConfig(seed=3, split_seed=7, test_fraction=0.1)
    assert comparison_fields(kept, tune=True) == {"tune_lr": True, "split_seed": 7}


def test_sweep_same_lr_and_surgical_flags_build_the_members():
    parser = cli.build_parser()
    args = parser.parse_args(["sweep", "--surgical", "--same-lr", "--model", "resnet18"])
    assert args.same_lr and args.surgical
    specs = cli.sweep_specs(None, False, "resnet18", surgical=True)
    assert [s.get("surgical_group") for s in specs[:-1]] == [1, 2, 3, 4, 5]
    assert specs[-1] == {"strategy": "full"}
    both = cli.sweep_specs(None, True, "resnet18", surgical=True)
    assert [s["strategy"] for s in both].count("full") == 1
