"""The run folder's contract: file format version, run states and their allowed changes,
the keys of summary.json and the columns of metrics.jsonl. See DESIGN.md ("The run
directory") for what each file holds.

Every file a run folder holds carries "schema" (metrics.jsonl: on every record, so lines of
an older writer and a newer one can share a resumed run's file). Files without it are
version 1, as written before versions existed; readers take every version up to
SCHEMA_VERSION and say so when a file is newer than this code.
"""

from __future__ import annotations

import math
import re
from typing import Any

from finetune_core.callbacks import RECORD_FIELDS

SCHEMA_VERSION = 2  # 1: before versions were written; 2: "schema" written into every file

# queued: waiting for the supervisor; running: a worker process owns the run.
LIVE_STATES = ("queued", "running")
# A final state has no process behind it; stopped, crashed and failed runs can be resumed.
FINAL_STATES = ("completed", "failed", "stopped", "crashed")
STATES = LIVE_STATES + FINAL_STATES
RESUMABLE_STATES = ("stopped", "crashed", "failed")

# state -> the states it may change to (running -> running: the worker claims a run that
# was started for it; resumable -> running: a foreground resume runs it at once)
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("running", "stopped"),
    "running": ("running", "completed", "failed", "stopped", "crashed"),
    "completed": (),
    "failed": ("queued", "running"),
    "stopped": ("queued", "running"),
    "crashed": ("queued", "running"),
}

# What readers show, never written: a running run whose worker is alive but silent (no
# heartbeat for longer than the stale limit), and a status.json that cannot be read.
STALLED = "stalled"
UNKNOWN = "unknown"
# states a worker process is behind (Stop applies, Delete does not)
ACTIVE_STATES = ("running", STALLED)

CRASHED_MESSAGE = (
    "the worker process ended without a final state; resume to continue from the last checkpoint"
)

_NUMBER = (int, float)
# status.json's fields that code acts on or shows -> the types they may hold (null always)
STATUS_TYPES: dict[str, tuple[type, ...]] = {
    "state": (str,),
    "pid": (int,),
    "pid_started_at": _NUMBER,
    "created_at": _NUMBER,
    "started_at": _NUMBER,
    "updated_at": _NUMBER,
    "finished_at": _NUMBER,
    "heartbeat_at": _NUMBER,
    "stop_requested_at": _NUMBER,
    "epoch": (int,),
    "epochs": (int,),
    "step": (int,),
    "total_steps": (int,),
    "eta_s": _NUMBER,
    "stage_fraction": _NUMBER,
    "total_params": (int,),
    "trainable_params": (int,),
    "exit_code": (int,),
    "message": (str,),
    "phase": (str,),
    "stage": (str,),
    "resume": (bool,),
    "resumable": (bool,),
    "cancelled": (bool,),
    # a run whose worker a cluster runs (absent for a local run): the backend that started
    # it ("ray"), the cluster's id of its job, and the host its worker runs on (null until
    # the job's worker starts); its pid means something on that host only
    "backend": (str,),
    "job_id": (str,),
    "host": (str,),
}
# the fields that name a run's cluster job: cleared when another owner takes the run
JOB_FIELDS = ("backend", "job_id", "host")


def status_problem(data: Any) -> str | None:
    """Returns what makes status.json's content unusable (not an object, an unknown state, a
    field of the wrong type), or None when code can rely on it."""
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object"
    for key, kinds in STATUS_TYPES.items():
        value = data.get(key)
        if value is None:
            continue
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if wrong_bool or not isinstance(value, kinds):
            return f"its {key!r} is {_shown(value)}, not {_kind_words(kinds)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"its {key!r} is {value}, not a finite number"
    if data.get("state") not in STATES:
        return f"its 'state' is {_shown(data.get('state'))}, not one of {', '.join(STATES)}"
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind_words(kinds: tuple[type, ...]) -> str:
    if kinds == _NUMBER:
        return "a number"
    return {int: "a whole number", str: "a text", bool: "true or false"}[kinds[0]]


RUN_ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")

_DTYPES = {str: "string", int: "Int64", float: "float64"}
METRIC_COLUMNS = {name: _DTYPES[kind] for name, kind in RECORD_FIELDS.items()}

# The drift record (finetune_core/drift.py): one line of metrics.jsonl after each epoch, at
# the step of its val record, with "drift" {group: ||θ − θ₀|| / ||θ₀||} and "start_norm"
# {group: ||θ₀||}, stem first and the head last. Not a metric: read_metrics leaves it out,
# read_drift reads it into DRIFT_COLUMNS, one row per (epoch, group).
DRIFT_SPLIT = "drift"
DRIFT_COLUMNS = {
    "epoch": "Int64",
    "step": "Int64",
    "time_s": "float64",
    "phase": "string",
    "group": "string",
    "drift": "float64",
    "start_norm": "float64",
}

SUMMARY_KEYS = (
    "state",
    "best_val_acc",
    "final_val_acc",
    "test_acc",
    "trainable_params",
    "trainable_params_per_phase",
    "total_params",
    "train_time_s",
    "classes",
    "per_class_acc",
    "confusion_matrix",
    "skipped_files",
)


class RunError(ValueError):
    """A run reference that matches no run or several, an action the run's state forbids, or
    a run file this code cannot read."""


def version_of(data: dict[str, Any]) -> int:
    """Returns the format version a file's content was written in (1 when it names none)."""
    version = data.get("schema", 1)
    return version if isinstance(version, int) else 1


def upgrade(data: dict[str, Any], what: str) -> dict[str, Any]:
    """Returns a file's content in the current format; RunError for a newer version.

    Version 2 only added the "schema" key, so older content reads as it is. A later format
    change adds its step here (version n -> n + 1) and keeps the older ones.
    """
    version = version_of(data)
    if version > SCHEMA_VERSION:
        raise RunError(
            f"{what} is in format {version}, newer than this finetune_core reads "
            f"({SCHEMA_VERSION}); update finetune_core to open this run"
        )
    return data


def stamped(data: dict[str, Any]) -> dict[str, Any]:
    """Returns data with the current format version, the way every writer saves it."""
    return {**data, "schema": SCHEMA_VERSION}
