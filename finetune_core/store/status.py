"""status.json: a run's state and progress. Every state change goes through `set_state`,
which knows which changes are allowed and what each state implies; progress goes through
`write_progress`. Both read, change and write the file under a lock shared by the worker,
the supervisor and the dashboard, and replace it atomically.

Whoever reads a status whose process is gone without a final state records "crashed", so
a run never stays "running" after its worker died.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_core.store.schema import (
    CRASHED_MESSAGE,
    FINAL_STATES,
    RESUMABLE_STATES,
    TRANSITIONS,
    RunError,
    stamped,
    upgrade,
)
from finetune_core.util.files import read_json, write_json_atomic
from finetune_core.util.locks import FileLock
from finetune_core.util.processes import process_alive, process_start_time

Change = Callable[[dict[str, Any]], dict[str, Any] | None]


def new_status(owner_pid: int | None = None) -> dict[str, Any]:
    """Returns the status of a run just created: queued, or running in owner_pid (the CLI
    training it in the foreground, so that no supervisor picks it up)."""
    now = time.time()
    status = {
        "state": "queued",
        "pid": None,
        "pid_started_at": None,
        "created_at": now,
        "started_at": None,
        "updated_at": now,
        "epoch": 0,
        "step": 0,
        "total_steps": None,
        "message": "waiting for the queue",
        "resume": False,
    }
    if owner_pid is not None:
        status.update(_claimed_by(owner_pid), started_at=None, message="starting")
    return stamped(status)


def _claimed_by(pid: int) -> dict[str, Any]:
    return {"state": "running", "pid": pid, "pid_started_at": process_start_time(pid)}


def _read_file(run_dir: Path) -> dict[str, Any]:
    data = read_json(run_dir / "status.json")
    if not isinstance(data, dict):
        return {}
    return upgrade(data, f"{run_dir / 'status.json'}")


def update_status(run_dir: str | os.PathLike, change: Change) -> dict[str, Any]:
    """Applies change(status) -> dict of fields (or None for no change) atomically, under the
    status lock; returns the status after it."""
    run_dir = Path(run_dir)
    with FileLock(run_dir / ".status.lock"):
        status = _read_file(run_dir)
        fields = change(dict(status))
        if fields:
            status = stamped({**status, **fields, "updated_at": time.time()})
            write_json_atomic(run_dir / "status.json", status)
    return status


def write_status(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merges fields into status.json as they are (no state checks): for tests and repairs.
    Code that changes a run's state calls set_state."""
    return update_status(run_dir, lambda _s: fields)


def _implied(to: str, now: float) -> dict[str, Any]:
    """Returns the fields entering state `to` sets, before the caller's own."""
    if to == "running":
        return {
            "started_at": now,
            "finished_at": None,
            "exit_code": None,
            "eta_s": None,
            "stop_requested_at": None,
            "resumable": None,
        }
    if to == "queued":
        return {
            "pid": None,
            "pid_started_at": None,
            "finished_at": None,
            "exit_code": None,
            "eta_s": None,
            "stop_requested_at": None,
            "resumable": None,
        }
    if to in FINAL_STATES:
        return {"finished_at": now, "eta_s": None}
    raise ValueError(f"unknown state {to!r}")


def set_state(
    run_dir: str | os.PathLike,
    to: str,
    *,
    when: Callable[[dict[str, Any]], bool] | None = None,
    pid: int | Callable[[], int] | None = None,
    **fields: Any,
) -> dict[str, Any] | None:
    """Moves the run to state `to` when its current state allows it (TRANSITIONS) and
    when(status) holds; returns the new status, or None when nothing changed.

    Entering "running" needs the pid of the process that owns the run, or a function that
    starts that process and returns its pid: it is called under the status lock once the
    change is allowed, so the process can never see the run before it is marked as its.
    Entering "queued" clears the previous owner; a final state records when it was
    reached. `fields` are written with it (message, exit_code, ...).
    """
    if to == "running" and pid is None:
        raise ValueError("a running run needs the pid of the process that owns it")
    changed: list[dict[str, Any]] = []

    def change(status: dict[str, Any]) -> dict[str, Any] | None:
        if to not in TRANSITIONS.get(status.get("state"), ()):
            return None
        if when is not None and not when(status):
            return None
        update = {**_implied(to, time.time()), "state": to}
        if pid is not None:
            update.update(_claimed_by(pid() if callable(pid) else pid))
        update.update(fields)
        changed.append(update)
        return update

    after = update_status(run_dir, change)
    return after if changed else None


def write_progress(
    run_dir: str | os.PathLike,
    *,
    when: Callable[[dict[str, Any]], bool] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Merges progress fields (epoch, step, message, ...) into status.json, when(status)
    holds if given; the state itself only changes through set_state."""
    if "state" in fields:
        raise ValueError("write_progress does not change the state; use set_state")
    return update_status(run_dir, lambda status: fields if when is None or when(status) else None)


def any_queued(root: str | os.PathLike) -> bool:
    """Returns True when a run in the runs folder root waits in the queue (a cheap look at
    each status.json: no crash detection)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return False
    for e in entries:
        if e.is_dir() and not e.name.startswith("."):
            status = read_json(Path(e.path) / "status.json")
            if isinstance(status, dict) and status.get("state") == "queued":
                return True
    return False


def can_resume(status: dict[str, Any]) -> bool:
    """Returns True for a stopped, crashed or failed run that a resume may continue: not one
    that failed on its own input (the worker marks those resumable: false)."""
    return status.get("state") in RESUMABLE_STATES and status.get("resumable", True) is not False


def is_orphaned(status: dict[str, Any]) -> bool:
    """Returns True for a running run whose process is gone (or is another process now)."""
    return status.get("state") == "running" and not process_alive(
        status.get("pid"), status.get("pid_started_at")
    )


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Returns status.json; a "running" run whose process is gone or reused becomes "crashed".

    The crash is written to the file (under the status lock, after re-reading it, so a
    worker that wrote its final state just before exiting is never marked crashed).
    """
    run_dir = Path(run_dir)
    try:
        status = _read_file(run_dir)
    except RunError as e:
        return {"state": "unknown", "message": str(e)}
    if not status:
        return {"state": "unknown", "message": "status.json is missing or unreadable"}
    if is_orphaned(status):
        crashed = set_state(run_dir, "crashed", when=is_orphaned, message=CRASHED_MESSAGE)
        status = crashed or _read_file(run_dir)
    return status
