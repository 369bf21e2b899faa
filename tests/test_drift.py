"""What fine-tuning changed: the weight drift ||θ − θ₀|| / ||θ₀|| per group and epoch (its
numbers, a real gradual run's records, a resume that keeps the reference), how the store
reads the drift records, the drift heatmaps, and the phase markers on the curves."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_runs import tiny_flags
from torch import nn

from finetune_core import checkpoints, drift, engine, models, plots, runner, store, worker
from finetune_core.callbacks import Callback, StopTraining
from finetune_core.store.metrics import drift_frame, metrics_frame

REPO = Path(__file__).resolve().parent.parent
GRADUAL = tiny_flags(epochs=2, seed=3, strategy="gradual")
BACKBONE = ["stem", "layer1", "layer2", "layer3", "layer4"]


# ---------------------------------------------------------------------------------------
# The numbers


def toy_parts() -> models.ModelParts:
    """Returns a three-layer model: groups "low" and "high", the head; ||θ₀|| = 5, 5, 2."""
    model = nn.Sequential(
        nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        model[1].weight.copy_(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
        model[2].weight.copy_(torch.tensor([[0.0, 2.0]]))
    groups = [models.Group("low", ("0",)), models.Group("high", ("1",))]
    return models.ModelParts("toy", model, "2", groups)


def test_drift_is_the_norm_of_the_change_over_the_starting_norm_per_group():
    parts = toy_parts()
    reference = drift.Reference(parts, trained={"0.weight", "2.weight"})
    assert reference.norms() == {"low": 5.0, "high": 5.0, "head": 2.0}
    assert set(reference.start) == {"0.weight", "2.weight"}  # no copy of what never trains
    with torch.no_grad():
        parts.model[0].weight.sub_(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))  # ||Δ|| = 1
        parts.model[2].weight.add_(torch.tensor([[1.5, 2.0]]))  # ||Δ|| = 2.5
    assert reference.drift(parts.model) == {"low": 0.2, "high": 0.0, "head": 1.25}
    # only what has trained so far is compared: the rest is exactly 0, computed or not
    assert reference.drift(parts.model, moved={"2.weight"}) == {
        "low": 0.0,
        "high": 0.0,
        "head": 1.25,
    }


def test_a_group_that_never_trains_reads_exactly_zero_without_a_copy():
    parts = toy_parts()
    reference = drift.Reference(parts, trained={"2.weight"})  # a linear probe
    with torch.no_grad():
        parts.model[0].weight.mul_(2)  # not trained: never compared, so never counted
        parts.model[2].weight.mul_(-1)  # ||Δ|| = 4
    assert reference.drift(parts.model) == {"low": 0.0, "high": 0.0, "head": 2.0}
    assert list(reference.start) == ["2.weight"]


# ---------------------------------------------------------------------------------------
# A real run


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def gradual_run(tmp_path_factory) -> Path:
    """A real 2-epoch gradual run of the CLI: epoch 1 a linear probe, epoch 2 unfreezes layer4."""
    runs = tmp_path_factory.mktemp("drift") / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "finetune_core", "train", *GRADUAL, "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def _by_epoch(frame) -> dict[int, dict[str, float]]:
    return {
        int(e): dict(zip(rows["group"], rows["drift"], strict=True))
        for e, rows in frame.groupby("epoch")
    }


def test_a_gradual_run_records_zero_for_frozen_groups_until_they_unfreeze(gradual_run):
    frame = store.read_drift(gradual_run)
    assert list(frame.columns) == list(store.DRIFT_COLUMNS)
    by_epoch = _by_epoch(frame)
    assert list(by_epoch) == [1, 2]
    assert list(by_epoch[1]) == [*BACKBONE, "head"]  # stem first, the head last
    assert all(by_epoch[1][g] == 0.0 for g in BACKBONE)  # the linear probe phase
    assert by_epoch[1]["head"] > 0
    assert by_epoch[2]["layer4"] > 0  # unfrozen in epoch 2
    assert all(by_epoch[2][g] == 0.0 for g in BACKBONE[:-1])
    phases = frame.drop_duplicates("epoch")["phase"].tolist()
    assert phases == ["linear probe", "unfreeze layer4"]
    val = store.read_metrics(gradual_run).query("split == 'val'")
    assert frame.drop_duplicates("epoch")["step"].tolist() == val["step"].tolist()
    # the reference: ||θ₀|| of every group, the same after each epoch
    norms = frame.pivot(index="group", columns="epoch", values="start_norm")
    assert (norms[1] > 0).all() and norms[1].equals(norms[2])


def test_the_recorded_drift_is_the_runs_weights_against_the_prepared_model(gradual_run):
    """θ₀ is the model engine.prepare builds (starting weights and the seeded new head):
    the best checkpoint against a freshly prepared model gives the drift of its epoch."""
    cfg = store.run_config(gradual_run)
    best_epoch = store.read_summary(gradual_run)["best_epoch"]
    start = engine.prepare(cfg).parts
    trained = copy.deepcopy(start)
    checkpoints.load_onto(gradual_run / "checkpoints" / "best.safetensors", trained)
    reference = drift.Reference(start, trained=dict(start.model.named_parameters()))
    expected = reference.drift(trained.model)
    recorded = _by_epoch(store.read_drift(gradual_run))[best_epoch]
    assert recorded == pytest.approx(expected, rel=1e-6, abs=1e-12)


class _StopAt(Callback):
    """Stops the run after the second step of epoch 2 (as Stop would), checkpointed."""

    def on_batch_end(self, trainer) -> None:
        if trainer.step == trainer.steps_per_epoch + 2:
            raise StopTraining("test: stop in epoch 2")


def test_a_resumed_run_measures_drift_from_the_same_starting_weights(gradual_run, tmp_path):
    runs = tmp_path / "runs"
    run_dir = store.create_run(store.run_config(gradual_run), runs, owner_pid=os.getpid())
    assert worker.run_worker(run_dir, callbacks=[_StopAt()]) == 130
    assert list(store.read_drift(run_dir)["epoch"].unique()) == [1]
    runner.resume_run(run_dir, owner_pid=os.getpid())
    assert worker.run_worker(run_dir) == 0
    resumed, straight = store.read_drift(run_dir), store.read_drift(gradual_run)
    assert resumed[["epoch", "step", "group"]].equals(straight[["epoch", "step", "group"]])
    assert resumed["start_norm"].tolist() == pytest.approx(straight["start_norm"].tolist())
    # a reference taken at the resume (the checkpoint's weights) would give less in epoch 2
    assert resumed["drift"].tolist() == pytest.approx(straight["drift"].tolist(), rel=1e-4)


# ---------------------------------------------------------------------------------------
# The store


def _write(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({**r, "schema": 2}) + "\n" for r in records]
    (run_dir / "metrics.jsonl").write_text("".join(lines))


def _val(epoch, step, phase, acc=0.5, time_s=None):
    return dict(
        split="val",
        epoch=epoch,
        step=step,
        loss=1.0,
        acc=acc,
        acc5=None,
        lr=0.01,
        time_s=float(step) if time_s is None else time_s,
        images_per_s=10.0,
        phase=phase,
    )


def _train(epoch, step, loss=1.0, lr=0.01):
    return dict(
        split="train",
        epoch=epoch,
        step=step,
        loss=loss,
        acc=0.5,
        acc5=None,
        lr=lr,
        time_s=float(step),
        images_per_s=10.0,
    )


def _drift(epoch, step, values, phase="full"):
    return drift.drift_record(
        epoch=epoch,
        step=step,
        time_s=float(step),
        phase=phase,
        drift=values,
        start_norm=dict.fromkeys(values, 2.0),
    )


def test_read_metrics_leaves_drift_records_out_and_read_drift_keeps_the_resumed_ones(tmp_path):
    records = [
        _train(1, 5),
        _val(1, 10, "full"),
        _drift(1, 10, {"stem": 0.1, "head": 0.5}),
        _train(2, 15),
        _drift(2, 20, {"stem": 0.9, "head": 0.9}),  # the dead attempt's, past the checkpoint
        _train(2, 15, loss=0.7),  # the resume starts again from step 10
        _val(2, 20, "full"),
        _drift(2, 20, {"stem": 0.2, "head": 0.6}),
    ]
    _write(tmp_path, records)
    metrics = store.read_metrics(tmp_path)
    assert metrics["split"].tolist() == ["train", "val", "train", "val"]
    assert "drift" not in metrics.columns and "start_norm" not in metrics.columns
    frame = store.read_drift(tmp_path)
    assert frame["epoch"].tolist() == [1, 1, 2, 2]
    assert frame["group"].tolist() == ["stem", "head", "stem", "head"]
    assert frame["drift"].tolist() == [0.1, 0.5, 0.2, 0.6]
    assert str(frame["epoch"].dtype) == "Int64" and str(frame["drift"].dtype) == "float64"
    assert store.read_drift(tmp_path / "nothing").empty  # a run without metrics yet


# ---------------------------------------------------------------------------------------
# The heatmaps


def test_the_drift_heatmap_draws_groups_stem_to_head_against_the_epoch(gradual_run):
    frame = store.read_drift(gradual_run)
    fig = plots.drift_heatmap(frame)
    zero, coloured = fig.data
    assert list(coloured.y) == [*BACKBONE, "head"] and list(coloured.x) == [1, 2]
    values = _by_epoch(frame)
    for i, group in enumerate(coloured.y):
        for j, epoch in enumerate(coloured.x):
            value = values[epoch][group]
            assert coloured.customdata[i][j][0] == value  # the hover's exact number
            assert (zero.z[i][j] == 1.0) == (value == 0.0)  # grey: exactly 0
            assert (coloured.z[i][j] is None) == (value == 0.0)
    top = max(v for epoch in values.values() for v in epoch.values())
    assert fig.layout.coloraxis.cmax == pytest.approx(math.log10(top))
    assert plots.drift_heatmap(frame.iloc[0:0]).layout.title.text.startswith("Weight drift")


def test_the_side_by_side_heatmaps_share_one_colour_scale_and_average_seeds():
    a = drift_frame([_drift(1, 10, {"stem": 0.01, "head": 0.5})])
    b = drift_frame([_drift(1, 10, {"stem": 0.03, "head": 0.7})])
    probe = drift_frame([_drift(1, 10, {"stem": 0.0, "head": 0.1})])
    fig = plots.drift_heatmaps(
        {"r1": a, "r2": b, "r3": probe}, {"full": ["r1", "r2"], "lp": ["r3"]}
    )
    assert [a.text for a in fig.layout.annotations] == ["full", "lp"]
    coloured = [t for t in fig.data if t.coloraxis == "coloraxis"]
    assert len(coloured) == 2
    full = coloured[0].customdata
    assert full[0][0][0] == pytest.approx(0.02) and full[1][0][0] == pytest.approx(0.6)
    assert fig.layout.coloraxis.cmin == pytest.approx(-1.69897, abs=1e-4)  # log10 0.02
    assert fig.layout.coloraxis.cmax == pytest.approx(-0.2218, abs=1e-4)  # log10 0.6
    assert "seeds: mean" in fig.layout.title.text


# ---------------------------------------------------------------------------------------
# Phase markers


def _shapes(fig) -> dict[str, float]:
    return {s.name: s.x0 for s in fig.layout.shapes}


def _run(phases: list[str], per_epoch: int = 10) -> list[dict]:
    records = []
    for epoch, phase in enumerate(phases, start=1):
        records.append(_train(epoch, (epoch - 1) * per_epoch + per_epoch // 2))
        records.append(_val(epoch, epoch * per_epoch, phase))
    return records


def test_gradual_unfreezing_is_marked_where_each_phase_starts_on_loss_accuracy_and_lr():
    metrics = metrics_frame(_run(["linear probe", "unfreeze layer4", "unfreeze layer3"]))
    charts = plots.training_charts(metrics)
    plots.mark_training_charts(charts, metrics, {"warmup_epochs": 0})
    for key in ("loss", "accuracy", "lr"):
        assert _shapes(charts[key]) == {"phase: unfreeze layer4": 10, "phase: unfreeze layer3": 20}
        labels = [a.text for a in charts[key].layout.annotations]
        assert labels == ["unfreeze layer4", "unfreeze layer3"]
    assert _shapes(charts["throughput"]) == {}


def test_lp_ft_is_marked_once_at_the_end_of_the_probe_with_the_end_of_warm_up():
    metrics = metrics_frame(_run(["linear probe", "linear probe", "fine-tune"]))
    markers = plots.phase_markers(metrics, {"warmup_epochs": 0.5})
    assert [(m.kind, m.label, m.step, m.epoch) for m in markers] == [
        ("warmup", "end of warm-up", 5.0, 0.5),
        ("phase", "LP → FT", 20.0, 2.0),
    ]
    assert markers[0].time_s == pytest.approx(5.0)  # the records' seconds at step 5
    fig = plots.loss_chart(metrics)
    plots.add_phase_markers(fig, markers, x="epoch")
    assert _shapes(fig) == {"warmup: end of warm-up": 0.5, "phase: LP → FT": 2.0}
    # a warm-up the run has not reached yet is not drawn
    assert plots.phase_markers(metrics, {"warmup_epochs": 5}) == markers[1:]


def test_a_live_run_marks_the_phase_under_way_from_its_status():
    metrics = metrics_frame(_run(["linear probe"]))
    status = {"state": "running", "epoch": 2, "phase": "unfreeze layer4"}
    markers = plots.phase_markers(metrics, {}, status)
    assert [(m.label, m.step) for m in markers] == [("unfreeze layer4", 10.0)]
    assert plots.phase_markers(metrics, {}) == []


def test_compare_curves_mark_each_strategys_phases_in_its_colour_and_shared_ones_once():
    lp = metrics_frame(_run(["linear probe", "fine-tune"]))
    full = metrics_frame(_run(["full", "full"]))
    frame = pd.concat(
        [lp.assign(run="lp_ft 1", run_id="a"), full.assign(run="full", run_id="b")],
        ignore_index=True,
    )
    configs = {"a": {"warmup_epochs": 1}, "b": {"warmup_epochs": 1}}
    fig = plots.mark_compare_curves(plots.compare_curves(frame, "acc", "epoch"), frame, configs)
    colour = {t.name: t.line.color for t in fig.data}
    lines = {s.name: (s.x0, s.line.color) for s in fig.layout.shapes}
    assert lines == {
        "phase: LP → FT": (1.0, colour["lp_ft 1"]),
        "warmup: end of warm-up": (1.0, "#777777"),  # both strategies: drawn once, grey
    }
