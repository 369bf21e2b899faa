"""status.json: a run's state and progress. Every state change goes through `set_state`,
which knows which changes are allowed and what each state implies; progress goes through
`write_progress`. Both read, change and write the file under a lock shared by the worker,
the supervisor and the dashboard, and replace it atomically.

Readers never write: `read_status` shows a "running" run whose process is gone as
"crashed", and one whose worker is alive but has sent no heartbeat for longer than the
stale limit as "stalled", both marked `derived: true` and without touching the file, so
reading works on a full disk and from any number of pages at once. Only the supervisor's
scan, `stop` and `resume` record the crash (`record_crash`). A status.json that cannot be
read (bad JSON, not an object, a field of the wrong type) reads as state "unknown" with a
message saying why; nothing acts on such a run, and every other run carries on.

A worker writes `heartbeat_at` every few seconds from a thread of its own (so a long
training step is not taken for a stall); FINETUNE_STALE_S (default 300 s) is how long
silence may last.

A run whose worker a cluster runs (FINETUNE_RUNNER=ray) also records its `backend`, its
`job_id` and the `host` its worker runs on. Its pid tells whether it lives only on that
host: elsewhere a reader goes by the heartbeat alone (stalled, never crashed), and the
queue's supervisor asks the cluster's jobs API (runner.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from finetune_core.store.schema import (
    ACTIVE_STATES,
    CRASHED_MESSAGE,
    FINAL_STATES,
    JOB_FIELDS,
    RESUMABLE_STATES,
    STALLED,
    TRANSITIONS,
    UNKNOWN,
    RunError,
    stamped,
    status_problem,
    upgrade,
)
from finetune_core.util.files import (
    failed_write,
    read_json,
    write_json_atomic,
    write_json_in_place,
)
from finetune_core.util.locks import FileLock
from finetune_core.util.processes import process_alive, process_start_time, process_stopped

Change = Callable[[dict[str, Any]], dict[str, Any] | None]

STALE_S = 300.0  # seconds without a heartbeat after which a live worker reads as stalled
HEARTBEAT_S = 10.0  # seconds between a worker's heartbeats (at most a fifth of the limit)


def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


def stale_after_s() -> float:
    """Returns how long a running worker may go without a heartbeat before it reads as
    stalled: $FINETUNE_STALE_S, else 300 s."""
    return _env_seconds("FINETUNE_STALE_S", STALE_S)


def heartbeat_interval_s() -> float:
    """Returns the seconds between a worker's heartbeats: $FINETUNE_HEARTBEAT_S (10 s), at
    most a fifth of the stale limit, so a few missed beats never read as a stall."""
    return min(_env_seconds("FINETUNE_HEARTBEAT_S", HEARTBEAT_S), stale_after_s() / 5)


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


def this_host() -> str:
    """Returns this machine's host name, as a run's `host` records where its worker runs."""
    return socket.gethostname()


def _pid_is_here(status: dict[str, Any]) -> bool:
    """Returns True when status.json's pid names a process of this machine: always for a
    local run; for a cluster job's run only once its worker started, on this host."""
    if status.get("backend") is None:
        return True
    return status.get("pid") is not None and status.get("host") == this_host()


def _load(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Returns (status.json's content, None), or (None, what makes it unreadable)."""
    path = run_dir / "status.json"
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None, "status.json is missing"
    except OSError as e:
        return None, f"status.json cannot be read ({e.strerror or e})"
    except (ValueError, RecursionError) as e:  # bad JSON, bytes that are not UTF-8
        return None, f"status.json is not valid JSON ({e})"
    if isinstance(data, dict):
        try:
            data = upgrade(data, f"{path}")
        except RunError as e:
            return None, str(e)
    problem = status_problem(data)
    if problem is not None:
        return None, f"status.json is unreadable: {problem}"
    return data, None


def _read_file(run_dir: Path) -> dict[str, Any]:
    """Returns status.json's content for a writer: {} when it cannot be used (set_state then
    finds no state to change from and changes nothing)."""
    status, _problem = _load(run_dir)
    return status or {}


@contextlib.contextmanager
def _locked(run_dir: Path, timeout_s: float | None) -> Iterator[None]:
    lock = FileLock(run_dir / ".status.lock")
    if timeout_s is None:
        with lock:
            yield
        return
    deadline = time.monotonic() + timeout_s
    while not lock.try_acquire():
        if time.monotonic() >= deadline:
            raise RunError(
                f"status.json of run {run_dir.name} stays locked by another process (a stopped "
                f"or hung worker?) after {timeout_s:g} s; nothing was changed"
            )
        time.sleep(0.05)
    try:
        yield
    finally:
        lock.release()


def update_status(
    run_dir: str | os.PathLike,
    change: Change,
    *,
    last_word: bool = False,
    lock_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Applies change(status) -> dict of fields (or None for no change) atomically, under the
    status lock; returns the status after it.

    last_word=True (a final state): when the disk is too full for the temp file, the file
    is rewritten within the space it already holds instead of losing the word. With
    lock_timeout_s, RunError when the lock stays held that long (waits forever without).
    """
    run_dir = Path(run_dir)
    with _locked(run_dir, lock_timeout_s):
        status = _read_file(run_dir)
        fields = change(dict(status))
        if fields:
            status = stamped({**status, **fields, "updated_at": time.time()})
            try:
                write_json_atomic(run_dir / "status.json", status)
            except OSError as error:
                if not (last_word and failed_write(error)[0]):
                    raise
                write_json_in_place(run_dir / "status.json", status)
    return status


def write_status(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merges fields into status.json as they are (no state checks): for tests and repairs.
    Code that changes a run's state calls set_state."""
    return update_status(run_dir, lambda _s: fields)


def _implied(to: str, now: float) -> dict[str, Any]:
    """Returns the fields entering state `to` sets, before the caller's own."""
    fresh = {
        "finished_at": None,
        "exit_code": None,
        "eta_s": None,
        "stop_requested_at": None,
        "resumable": None,
        "heartbeat_at": None,  # the worker's first beat starts the clock of the stale limit
    }
    if to == "running":
        return {"started_at": now, **fresh}
    if to == "queued":
        return {"pid": None, "pid_started_at": None, **fresh}
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
    change is allowed, so the process can never see the run before it is marked as its. A
    cluster's job owns a run the same way: the function then returns the fields that name
    it (backend, job_id, and pid None until the job's worker starts). Entering "queued"
    clears the previous owner, job fields included, as does another process taking the run;
    a final state records when it was reached, and is written even on a full disk where the
    file's own space allows. `fields` are written with it (message, exit_code, ...).
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
        owner = pid() if callable(pid) else pid
        a_process = owner is not None and not isinstance(owner, dict)
        if to == "queued" or (a_process and owner != status.get("pid")):
            update.update({key: None for key in JOB_FIELDS if key in status})
        if a_process:
            update.update(_claimed_by(owner))
        update.update(fields)
        if isinstance(owner, dict):  # a job's fields, its message included
            update.update(owner)
        changed.append(update)
        return update

    after = update_status(run_dir, change, last_word=to in FINAL_STATES)
    return after if changed else None


def write_progress(
    run_dir: str | os.PathLike,
    *,
    when: Callable[[dict[str, Any]], bool] | None = None,
    lock_timeout_s: float | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Merges progress fields (epoch, step, message, ...) into status.json, when(status)
    holds if given; the state itself only changes through set_state."""
    if "state" in fields:
        raise ValueError("write_progress does not change the state; use set_state")
    return update_status(
        run_dir,
        lambda status: fields if when is None or when(status) else None,
        lock_timeout_s=lock_timeout_s,
    )


def any_queued(root: str | os.PathLike) -> bool:
    """Returns True when a run in the runs folder root waits in the queue (a cheap look at
    each status.json: no crash detection)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return False
    for e in entries:
        with contextlib.suppress(OSError):
            if e.is_dir() and not e.name.startswith("."):
                status, _problem = _load(Path(e.path))
                if status is not None and status.get("state") == "queued":
                    return True
    return False


def can_resume(status: dict[str, Any]) -> bool:
    """Returns True for a stopped, crashed or failed run that a resume may continue: not one
    that failed on its own input (the worker marks those resumable: false)."""
    return status.get("state") in RESUMABLE_STATES and status.get("resumable", True) is not False


def is_orphaned(status: dict[str, Any]) -> bool:
    """Returns True for a running run whose process is gone (or is another process now).

    Never for a cluster job's run whose worker is not on this host (or not started yet):
    its pid means nothing here; the heartbeat and the cluster tell.
    """
    return (
        status.get("state") == "running"
        and _pid_is_here(status)
        and not process_alive(status.get("pid"), status.get("pid_started_at"))
    )


def silent_for_s(status: dict[str, Any], now: float | None = None) -> float | None:
    """Returns the seconds since a running worker's last heartbeat (None before its first)."""
    beat = status.get("heartbeat_at")
    if status.get("state") != "running" or not isinstance(beat, (int, float)):
        return None
    return max(0.0, (time.time() if now is None else now) - beat)


def shown_status(status: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """Returns a recorded status as readers show it: a running run whose process is gone as
    "crashed", one whose worker went silent as "stalled" (derived: true, the recorded state
    kept in recorded_state); any other status as it is."""
    if status.get("state") != "running":
        return status
    if is_orphaned(status):
        return {
            **status,
            "state": "crashed",
            "message": CRASHED_MESSAGE,
            "derived": True,
            "recorded_state": "running",
        }
    silent, limit = silent_for_s(status, now), stale_after_s()
    if silent is not None and silent > limit:
        pid = status.get("pid")
        if not _pid_is_here(status):
            how = f" on {status.get('host')} (job {status.get('job_id')})"
        elif process_stopped(pid):
            how = " (the process is stopped: SIGSTOP or Ctrl-Z)"
        else:
            how = ""
        return {
            **status,
            "state": STALLED,
            "message": (
                f"not responding: worker pid {pid}{how} has sent no heartbeat for "
                f"{silent:.0f} s (limit {limit:g} s, FINETUNE_STALE_S); the queue's supervisor "
                "stops it, or press Stop"
            ),
            "derived": True,
            "recorded_state": "running",
        }
    return status


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Returns status.json as readers show it, without writing anything.

    A "running" run whose process is gone or reused reads as "crashed", one whose worker
    sent no heartbeat for longer than stale_after_s() as "stalled" (both derived: true;
    record_crash saves a crash). A file that cannot be read reads as state "unknown" with
    unreadable: true and a message saying what is wrong with it.
    """
    run_dir = Path(run_dir)
    status, problem = _load(run_dir)
    if status is None:
        return {
            "state": UNKNOWN,
            "unreadable": True,
            "message": f"{problem}; the run cannot be watched or resumed until the file is "
            "repaired, or the run is deleted",
        }
    return shown_status(status)


def record_crash(run_dir: str | os.PathLike, message: str = CRASHED_MESSAGE, **fields: Any):
    """Records "crashed" for a running run whose process is gone (checked again under the
    lock, so a worker that wrote its final state just before exiting keeps it); returns the
    new status, or None when the run was not orphaned. For the supervisor, stop and resume:
    readers only show the crash."""
    return set_state(run_dir, "crashed", when=is_orphaned, message=message, **fields)


def claim_for_job(run_dir: str | os.PathLike, job_id: str) -> dict[str, Any] | None:
    """Marks a run that a cluster's job `job_id` owns as this process's: its pid and this
    host, so that the worker this process becomes (exec) finds the run its own. Returns the
    new status, or None when the run is not that job's any more, or a stop was asked for
    before the job's worker started."""
    run_dir, me = Path(run_dir), os.getpid()

    def still_the_jobs(status: dict[str, Any]) -> bool:
        return (
            status.get("job_id") == job_id
            and status.get("pid") is None
            and status.get("stop_requested_at") is None
        )

    def owner() -> dict[str, Any]:
        return {"pid": me, "pid_started_at": process_start_time(me), "host": this_host()}

    return set_state(
        run_dir, "running", when=still_the_jobs, pid=owner, message="the worker starts"
    )


STOP_REQUEST = ".stop_request.json"  # who was asked to stop, and when (see request_stop)


def request_stop(
    run_dir: str | os.PathLike,
    pid: int | None,
    pid_started_at: float | None,
    job_id: str | None = None,
) -> None:
    """Records that worker pid (of cluster job job_id, if any) was asked to stop now: in
    .stop_request.json, written without the status lock (a SIGSTOPped worker may hold that
    lock for good), and as status.json's stop_requested_at when the lock comes within 2 s.
    A full disk loses only the record."""
    run_dir, now = Path(run_dir), time.time()
    request = {"pid": pid, "pid_started_at": pid_started_at, "at": now}
    if job_id is not None:  # a job's worker has no pid before it starts
        request["job_id"] = job_id
    with contextlib.suppress(OSError):
        write_json_atomic(run_dir / STOP_REQUEST, request)
    with contextlib.suppress(OSError, RunError):
        write_progress(
            run_dir,
            when=lambda s: (
                s.get("state") == "running" and s.get("pid") == pid and s.get("job_id") == job_id
            ),
            lock_timeout_s=2.0,
            message="stopping: saving a checkpoint",
            stop_requested_at=now,
        )


def stop_requested_at(run_dir: str | os.PathLike, status: dict[str, Any]) -> float | None:
    """Returns when the run's current worker was first asked to stop (None if it was not)."""
    asked = status.get("stop_requested_at")
    if isinstance(asked, (int, float)):
        return float(asked)
    request = read_json(Path(run_dir) / STOP_REQUEST)
    if not isinstance(request, dict):
        return None
    same = (request.get("pid"), request.get("pid_started_at"), request.get("job_id")) == (
        status.get("pid"),
        status.get("pid_started_at"),
        status.get("job_id"),
    )
    at = request.get("at")
    return float(at) if same and isinstance(at, (int, float)) and not isinstance(at, bool) else None


def is_active(status: dict[str, Any]) -> bool:
    """Returns True when a worker process is behind the run (running or stalled)."""
    return status.get("state") in ACTIVE_STATES
