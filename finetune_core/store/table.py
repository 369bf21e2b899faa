"""The one table of runs: a row per run from its config, status, summary and (only where the
summary does not say) its metrics. Home and `list`, Compare and `compare` show views of it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from finetune_core import strategies
from finetune_core.store.metrics import metrics_frame, read_metrics
from finetune_core.store.paths import run_dirs
from finetune_core.store.runs import disk_bytes, read_config, read_summary
from finetune_core.store.schema import RunError
from finetune_core.store.status import read_status


@dataclass
class RunReading:
    """What one run's files say; metrics are read on first use only."""

    run_id: str
    config: dict[str, Any]
    status: dict[str, Any]
    summary: dict[str, Any] | None
    run_dir: Path | None = None
    loaded_metrics: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def metrics(self) -> pd.DataFrame:
        """Returns the run's metrics frame (read from its folder the first time)."""
        if self.loaded_metrics is None:
            self.loaded_metrics = read_metrics(self.run_dir) if self.run_dir else metrics_frame([])
        return self.loaded_metrics

    def split(self, name: str) -> pd.DataFrame:
        m = self.metrics
        return m[m["split"] == name].sort_values("step") if not m.empty else m

    def from_summary(self, key: str) -> Any:
        return (self.summary or {}).get(key)


def read_run(run_dir: str | os.PathLike) -> RunReading:
    """Returns what a run folder's files say; RunError when its config cannot be read."""
    run_dir = Path(run_dir)
    return RunReading(
        run_dir.name, read_config(run_dir), read_status(run_dir), read_summary(run_dir), run_dir
    )


def _values(frame: pd.DataFrame, column: str) -> pd.Series:
    return frame[column].dropna() if column in frame else pd.Series(dtype="float64")


def _or_metrics(r: RunReading, key: str, split: str, column: str, pick) -> float | None:
    """Returns the summary's value of key, else pick(the split's column) from the metrics."""
    value = r.from_summary(key)
    if value is None:
        values = _values(r.split(split), column)
        value = float(pick(values)) if len(values) else None
    return value


def _counted(r: RunReading, key: str) -> int | None:
    value = r.from_summary(key)
    if value is None:
        value = r.status.get(key)  # the worker writes them at its start
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _trainable_pct(r: RunReading) -> float | None:
    trainable, total = _counted(r, "trainable_params"), _counted(r, "total_params")
    return 100.0 * trainable / total if trainable is not None and total else None


def _speed(r: RunReading) -> float | None:
    speed = _values(r.split("train"), "images_per_s")
    return float(speed.median()) if len(speed) else None


def _bound(r: RunReading, key: str, i: int) -> float | None:
    """Returns one end (0 low, 1 high) of the summary's 95 % interval `key`, if it has one."""
    ci = r.from_summary(key)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and ci[i] is not None:
        return float(ci[i])
    return None


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _lr(r: RunReading) -> float | None:
    lr = r.config.get("lr")
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


# created_at outside these years is no creation time (a broken or hand-edited status.json)
_SANE_TIMES = (datetime(1990, 1, 1).timestamp(), datetime(9000, 1, 1).timestamp())


def _created(r: RunReading) -> float:
    created = r.status.get("created_at")
    if isinstance(created, (int, float)) and _SANE_TIMES[0] <= created <= _SANE_TIMES[1]:
        return float(created)
    try:
        return (r.run_dir / "config.json").stat().st_mtime
    except (OSError, TypeError):
        return 0.0


# column -> how a run's reading gives it
COLUMNS: dict[str, Callable[[RunReading], Any]] = {
    "run_id": lambda r: r.run_id,
    "name": lambda r: r.config.get("name") or "",
    "model": lambda r: r.config.get("model"),
    "strategy": lambda r: r.config.get("strategy"),
    "label": lambda r: strategies.label(r.config),  # the strategy with its option: "last_n 1"
    "state": lambda r: r.status.get("state") or r.from_summary("state") or "unknown",
    "best_val_acc": lambda r: _or_metrics(r, "best_val_acc", "val", "acc", pd.Series.max),
    "final_val_acc": lambda r: _or_metrics(r, "final_val_acc", "val", "acc", lambda v: v.iloc[-1]),
    "test_acc": lambda r: r.from_summary("test_acc"),
    # 95 % bootstrap intervals of the best weights' accuracy over the split's images
    "best_val_acc_lo": lambda r: _bound(r, "best_val_acc_ci", 0),
    "best_val_acc_hi": lambda r: _bound(r, "best_val_acc_ci", 1),
    "test_acc_lo": lambda r: _bound(r, "test_acc_ci", 0),
    "test_acc_hi": lambda r: _bound(r, "test_acc_ci", 1),
    "trainable_params": lambda r: _counted(r, "trainable_params"),
    "total_params": lambda r: _counted(r, "total_params"),
    "trainable_pct": _trainable_pct,
    "train_time_s": lambda r: _or_metrics(r, "train_time_s", "train", "time_s", pd.Series.max),
    "images_per_s": _speed,
    "epochs_run": lambda r: r.from_summary("epochs_run"),
    # measured costs; runs from before they were measured leave them blank
    "peak_memory_bytes": lambda r: _whole(r.from_summary("peak_memory_bytes")),
    "memory_measure": lambda r: r.from_summary("memory_measure"),
    "stored_bytes": lambda r: _whole(r.from_summary("stored_bytes")),
    "seed": lambda r: _whole(r.config.get("seed")),
    "split_seed": lambda r: _whole(r.config.get("split_seed")),
    "lr": _lr,  # the lr the run trained with (the tuned one when tune_lr)
    "tune_lr": lambda r: r.config.get("tune_lr") is True,  # absent in older runs: False
    "group": lambda r: r.config.get("group"),
    "owner": lambda r: r.config.get("owner"),  # the user it belongs to; none in the local mode
    "created_at": _created,
    "disk_bytes": lambda r: disk_bytes(r.run_dir) if r.run_dir else 0,
    "path": lambda r: str(r.run_dir.resolve()) if r.run_dir else None,
}
_FLOATS = (
    "best_val_acc",
    "final_val_acc",
    "test_acc",
    "best_val_acc_lo",
    "best_val_acc_hi",
    "test_acc_lo",
    "test_acc_hi",
    "trainable_pct",
    "train_time_s",
    "peak_memory_bytes",
    "stored_bytes",
    "lr",
)


def _cell(column: str, r: RunReading) -> Any:
    try:
        return COLUMNS[column](r)
    except Exception:  # noqa: BLE001 - one odd file leaves a blank cell, never a broken table
        return None


def runs_table(readings: Iterable[RunReading], columns: Iterable[str]) -> pd.DataFrame:
    """Returns one row per reading (in order) with the given COLUMNS, numbers typed; a value
    a run's files do not give sensibly is left blank."""
    columns = list(columns)
    rows = [{c: _cell(c, r) for c in columns} for r in readings]
    frame = pd.DataFrame(rows, columns=columns)
    for column in (*_FLOATS, "images_per_s"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


LIST_COLUMNS = [
    "run_id",
    "name",
    "model",
    "strategy",
    "state",
    "best_val_acc",
    "trainable_pct",
    "train_time_s",
    "disk_bytes",
    "group",
    "owner",
    "created_at",
    "path",
]


def list_runs(runs_dir: str | os.PathLike) -> pd.DataFrame:
    """Returns one row per run, newest first; folders that are not runs are skipped.

    Columns: run_id, name, model, strategy (with its option: "last_n 1"), state,
    best_val_acc (0-1, NaN when unknown), trainable_pct (0-100), train_time_s, disk_bytes,
    group, owner (None in the local mode), created_at (local datetime), path (absolute).
    A running run whose worker is gone shows as crashed and one whose worker went silent as
    stalled (derived, nothing is written); a run whose status.json cannot be read shows as
    unknown.
    """
    readings = []
    for run_dir in run_dirs(Path(runs_dir)):
        if not (run_dir / "status.json").is_file():
            continue
        try:
            readings.append(read_run(run_dir))
        except RunError:
            continue  # half-written, foreign or unreadable: not a run to list
    columns = [("label" if c == "strategy" else c) for c in LIST_COLUMNS]
    frame = runs_table(readings, columns).rename(columns={"label": "strategy"})
    frame["created_at"] = pd.to_numeric(frame["created_at"], errors="coerce").fillna(0.0)
    frame["disk_bytes"] = pd.to_numeric(frame["disk_bytes"], errors="coerce").fillna(0)
    frame = frame.sort_values(["created_at", "run_id"], ascending=False, kind="stable")
    frame["created_at"] = pd.Series(
        [datetime.fromtimestamp(t) for t in frame["created_at"]],
        index=frame.index,
        dtype="datetime64[ns]",
    )
    frame["disk_bytes"] = frame["disk_bytes"].astype("int64")
    return frame.reset_index(drop=True)


COMPARE_COLUMNS = [
    "run_id",
    "name",
    "model",
    "strategy",
    "state",
    "best_val_acc",
    "final_val_acc",
    "test_acc",
    "trainable_params",
    "total_params",
    "trainable_pct",
    "train_time_s",
    "images_per_s",
    "epochs_run",
    "group",
    "path",
]


def compare_runs(run_dirs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Returns one row of final metrics per run, in the order given.

    Columns: run_id, name, model, strategy, state, best_val_acc, final_val_acc, test_acc
    (0-1), trainable_params, total_params, trainable_pct (0-100), train_time_s,
    images_per_s (median over train records), epochs_run, group, path. Values of a run
    without summary.json yet come from its metrics where they can.
    """
    frame = runs_table([read_run(d) for d in run_dirs], COMPARE_COLUMNS)
    for column in ("trainable_params", "total_params", "epochs_run"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    return frame
