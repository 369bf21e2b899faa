"""Background jobs that are not runs: a measured estimate, the extraction of an uploaded zip
(uploads.extract_job), the learning-rate finder later. A job is a folder,
`<runs>/.jobs/<job_id>/`, and a detached process (`python -m finetune_core job DIR`, see
worker.run_job) that reports its progress there, so a page can start one, show its
progress, cancel it, and find it again after a refresh or a closed tab. No torch here.

    job.json     {"kind", "args", "key", "created_at"}: what to do
    status.json  {"state": queued|running|completed|failed|cancelled, "pid", "pid_started_at",
                  "progress" (0-1 or null), "message", "updated_at", "schema"}
    result.json  what a completed job found
    job.log      the process's output, tracebacks included
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from finetune_core import runner
from finetune_core.util.files import read_json, write_json_atomic
from finetune_core.util.locks import FileLock
from finetune_core.util.processes import process_alive, process_start_time

JOBS_DIR = ".jobs"
LIVE = ("queued", "running")
FINAL = ("completed", "failed", "cancelled")
SCHEMA_VERSION = 1


def job_key(kind: str, args: Any) -> str:
    """Returns the identity of a job: the same work asked again finds the same job."""
    text = json.dumps([kind, args], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _root(runs_dir: str | os.PathLike) -> Path:
    return Path(runs_dir) / JOBS_DIR


def find(runs_dir: str | os.PathLike, kind: str, args: Any) -> Path | None:
    """Returns the folder of the newest job doing this work (live or done), or None."""
    folder = _root(runs_dir) / job_key(kind, args)
    return folder if (folder / "job.json").is_file() else None


def read(job_dir: str | os.PathLike) -> dict[str, Any]:
    """Returns the job's status with its result (when completed); a job whose process is
    gone without saying how it ended reads as failed."""
    job_dir = Path(job_dir)
    status = read_json(job_dir / "status.json")
    if not isinstance(status, dict):
        return {"state": "failed", "message": f"{job_dir} has no readable status"}
    pid = status.get("pid")
    if status.get("state") in LIVE and pid and not process_alive(pid, status.get("pid_started_at")):
        status = {**status, "state": "failed", "message": "the job's process ended unexpectedly"}
    if status.get("state") == "completed":
        status["result"] = read_json(job_dir / "result.json")
    return status


def update(job_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merges fields into the job's status (under its lock, atomically); returns it."""
    job_dir = Path(job_dir)
    with FileLock(job_dir / ".status.lock"):
        status = read_json(job_dir / "status.json") or {}
        status.update(fields, updated_at=time.time(), schema=SCHEMA_VERSION)
        write_json_atomic(job_dir / "status.json", status)
    return status


def start(
    runs_dir: str | os.PathLike, kind: str, args: Any, *, message: str = "", again: bool = False
) -> Path:
    """Returns the folder of a job doing this work: the one already live or completed, else
    a new one started in a detached process. again=True starts it anew after it completed
    too (what it made is gone), never beside a live one."""
    folder = _root(runs_dir) / job_key(kind, args)
    reuse = LIVE if again else (*LIVE, "completed")
    if (folder / "job.json").is_file() and read(folder).get("state") in reuse:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "status.json"):
        (folder / stale).unlink(missing_ok=True)
    write_json_atomic(
        folder / "job.json",
        {"kind": kind, "args": args, "key": folder.name, "created_at": time.time()},
    )
    update(folder, state="queued", progress=0.0, message=message or "starting", pid=None)
    proc = runner.BACKEND.spawn(["job", str(folder)], folder / "job.log", folder)
    update(folder, pid=proc.pid, pid_started_at=process_start_time(proc.pid))
    return folder


def claim(job_dir: str | os.PathLike) -> dict[str, Any]:
    """Marks the job as running in this process; returns job.json."""
    me = os.getpid()
    update(job_dir, state="running", pid=me, pid_started_at=process_start_time(me))
    spec = read_json(Path(job_dir) / "job.json")
    if not isinstance(spec, dict):
        raise ValueError(f"{job_dir} is not a job folder (no job.json)")
    return spec


def finish(job_dir: str | os.PathLike, state: str, message: str, result: Any = None) -> None:
    """Ends the job: its result (when completed), then its final state."""
    if state not in FINAL:
        raise ValueError(f"a job ends as one of {', '.join(FINAL)}, not {state!r}")
    if result is not None:
        write_json_atomic(Path(job_dir) / "result.json", result)
    update(job_dir, state=state, message=message, progress=1.0 if state == "completed" else None)


def cancel(job_dir: str | os.PathLike) -> bool:
    """Asks a live job to stop (SIGTERM); returns False when it was not live."""
    status = read(job_dir)
    if status.get("state") not in LIVE:
        return False
    pid = status.get("pid")
    if pid and process_alive(pid, status.get("pid_started_at")):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    update(job_dir, message="cancelling")
    return True
