"""The queue: one supervisor per runs folder starts queued runs as worker processes, at most
N at once; and queueing, stopping, cancelling and resuming runs. No torch here.

A run trains in a worker process (`python -m finetune_core worker RUN_DIR`, see worker.py),
never in a thread of the dashboard: closing a tab or restarting the server does not touch
it. One detached supervisor per runs folder (`python -m finetune_core queue`, guarded by an
exclusive lock on runs/.supervisor.lock) starts queued runs in creation order and marks
runs whose worker vanished as crashed. It exits after a minute with nothing to do;
`ensure_supervisor` starts it again when needed. How a worker is started and stopped is
the backend's (LocalProcesses today; a cluster queue can take its place).

Exit codes of a worker (and of `train` / `resume` in the foreground): 0 completed,
1 failed, 2 invalid input, 130 stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune_core import store
from finetune_core.config import ConfigError, RunConfig, validate_fields
from finetune_core.util.files import read_json, write_json_atomic
from finetune_core.util.locks import FileLock
from finetune_core.util.processes import process_alive

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_STOPPED = 130

SUPERVISOR_LOCK = ".supervisor.lock"
SETTINGS_FILE = "settings.json"
IDLE_EXIT_S = 60.0
POLL_S = 0.5


def exit_code(state: str) -> int:
    """Returns the process exit code of a final state: 0 completed, 130 stopped, else 1."""
    return {"completed": EXIT_COMPLETED, "stopped": EXIT_STOPPED}.get(state, EXIT_FAILED)


# ---------------------------------------------------------------------------------------------
# Detached processes


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Returns the environment for a detached child: finetune_core importable from anywhere,
    unbuffered output, and OpenMP's passive waiting unless the user chose otherwise.

    Training shares the CPU with the dashboard's server, other runs and the data pipeline.
    OpenMP's default busy-waiting collapses when threads outnumber free cores (measured on
    2 cores with other work running: ResNet-18 training fell from ~70 to ~6 images/s);
    passive waiting keeps it at ~70. It must be set before torch loads OpenMP.
    """
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if package_root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([package_root, *paths])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(extra or {})
    return env


class LocalProcesses:
    """The backend that runs each worker (and the supervisor) as a detached local process."""

    def __init__(self):
        self.children: list[subprocess.Popen] = []  # started here and not yet ended

    def spawn(
        self, args: list[str], log_path: Path, cwd: Path, extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Starts `python -m finetune_core ARGS` in its own session, output appended to
        log_path. A thread waits for it, so that it never lingers as a defunct process
        after it exits (a dashboard server starts a supervisor now and then)."""
        with open(log_path, "a") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "finetune_core", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=child_env(extra_env),
                start_new_session=True,  # no SIGINT/SIGHUP from the terminal or server
            )
        self.children.append(proc)
        threading.Thread(target=self._wait, args=(proc,), daemon=True).start()
        return proc

    def _wait(self, proc: subprocess.Popen) -> None:
        proc.wait()
        with contextlib.suppress(ValueError):
            self.children.remove(proc)

    def start_worker(self, run_dir: Path, parallel: int) -> subprocess.Popen:
        """Starts the worker of a run."""
        return self.spawn(
            ["worker", str(run_dir)], run_dir / "worker.log", run_dir, worker_threads(parallel)
        )

    def stop(self, pid: int) -> None:
        """Asks a worker to stop (SIGTERM: it saves a checkpoint and ends as stopped)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


BACKEND = LocalProcesses()


def worker_threads(parallel: int) -> dict[str, str]:
    """Returns the environment that gives each of `parallel` CPU workers its share of the cores
    (torch's default is every core per process, which oversubscribes them); {} for one worker
    or when the user set OMP_NUM_THREADS."""
    if parallel <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}


def _is_queued(status: dict[str, Any]) -> bool:
    return status.get("state") == "queued"


def _start_queued(run_dir: Path, parallel: int = 1) -> subprocess.Popen | None:
    """Starts a worker for a queued run and marks it running with the worker's pid."""
    started: list[subprocess.Popen] = []

    def start() -> int:
        started.append(BACKEND.start_worker(run_dir, parallel))
        return started[0].pid

    store.set_state(run_dir, "running", when=_is_queued, pid=start, message="starting the worker")
    return started[0] if started else None


def start_worker(run_dir: str | os.PathLike) -> int:
    """Starts a detached worker for a queued run; returns its pid. Raises RunError when the
    run is not queued."""
    run_dir = Path(run_dir).resolve()
    proc = _start_queued(run_dir)
    if proc is None:
        state = store.read_status(run_dir).get("state")
        raise store.RunError(f"run {run_dir.name} is {state}, not queued; nothing started")
    return proc.pid


# ---------------------------------------------------------------------------------------------
# The supervisor


def read_settings(runs_dir: str | os.PathLike) -> dict[str, Any]:
    """Returns runs_dir/settings.json ({} when absent)."""
    data = read_json(Path(runs_dir) / SETTINGS_FILE)
    return data if isinstance(data, dict) else {}


def set_max_parallel(runs_dir: str | os.PathLike, n: int) -> None:
    """Sets how many runs the supervisor of runs_dir trains at once (read at every poll)."""
    if int(n) < 1:
        raise ValueError(f"max parallel runs must be at least 1, got {n}")
    root = Path(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    settings = read_settings(root)
    settings["max_parallel"] = int(n)
    write_json_atomic(root / SETTINGS_FILE, settings)


def parallel_limit(runs_dir: str | os.PathLike, explicit: int | None = None) -> int:
    """Returns the runs trained at once: explicit, else $FINETUNE_MAX_PARALLEL, else
    settings.json's max_parallel, else 1."""
    for value in (explicit, os.environ.get("FINETUNE_MAX_PARALLEL")):
        if value not in (None, ""):
            with contextlib.suppress(TypeError, ValueError):
                return max(1, int(value))
    with contextlib.suppress(TypeError, ValueError):
        return max(1, int(read_settings(runs_dir).get("max_parallel", 1)))
    return 1


def supervisor_running(runs_dir: str | os.PathLike) -> bool:
    """Returns True when a supervisor holds the lock of runs_dir."""
    return FileLock(Path(runs_dir) / SUPERVISOR_LOCK).held_elsewhere()


def ensure_supervisor(
    runs_dir: str | os.PathLike,
    max_parallel: int | None = None,
    *,
    idle_exit_s: float | None = None,
) -> bool:
    """Starts a detached supervisor for runs_dir unless one runs; returns True when started."""
    root = Path(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if supervisor_running(root):
        return False
    args = ["queue", "--runs-dir", str(root)]
    if max_parallel is not None:
        args += ["--max-parallel", str(int(max_parallel))]
    if idle_exit_s is not None:
        args += ["--idle-exit", str(idle_exit_s)]
    BACKEND.spawn(args, root / "supervisor.log", root)
    return True


def _scan(root: Path) -> tuple[list[Path], int]:
    """Returns (queued runs oldest first, number of running runs); marks orphans crashed."""
    queued, running = [], 0
    for run_dir in store.run_dirs(root):
        if not store.is_run_dir(run_dir):
            continue
        status = store.read_status(run_dir)
        state = status.get("state")
        if state == "running":
            running += 1
        elif state == "queued":
            created = status.get("created_at")
            queued.append((created if isinstance(created, (int, float)) else 0.0, run_dir))
    queued.sort(key=lambda item: (item[0], item[1].name))
    return [d for _, d in queued], running


def _record_exit(run_dir: Path, proc: subprocess.Popen, code: int) -> None:
    """Marks a run crashed when its worker exited without writing a final state."""
    with contextlib.suppress(OSError):
        store.set_state(
            run_dir,
            "crashed",
            when=lambda s: s.get("pid") == proc.pid,
            message=f"{store.CRASHED_MESSAGE} (exit code {code})",
            exit_code=code,
        )


def supervise(
    runs_dir: str | os.PathLike,
    max_parallel: int | None = None,
    *,
    idle_exit_s: float = IDLE_EXIT_S,
    poll_s: float = POLL_S,
) -> int:
    """Runs the queue of runs_dir until idle for idle_exit_s; returns 0.

    Returns at once when another supervisor holds the lock. Runs started by a foreground
    `train` count against the limit too.
    """
    root = Path(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / SUPERVISOR_LOCK)
    if not lock.try_acquire():
        print(f"a supervisor already runs for {root}", file=sys.stderr)
        return 0
    lock.write_owner(f"{os.getpid()}\n")
    stopping = []
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):
            previous[sig] = signal.signal(sig, lambda *_: stopping.append(True))
    workers: dict[Path, subprocess.Popen] = {}
    idle_since = time.monotonic()
    print(f"{datetime.now():%H:%M:%S} supervisor pid {os.getpid()} watches {root}", flush=True)
    try:
        while not stopping:
            for run_dir, proc in list(workers.items()):
                code = proc.poll()
                if code is not None:
                    del workers[run_dir]
                    _record_exit(run_dir, proc, code)
            queued, running = _scan(root)
            limit = parallel_limit(root, max_parallel)
            for run_dir in queued[: max(limit - running, 0)]:
                proc = _start_queued(run_dir, limit)
                if proc is not None:
                    workers[run_dir] = proc
                    running += 1
                    print(f"{datetime.now():%H:%M:%S} started {run_dir.name}", flush=True)
            now = time.monotonic()
            if queued or running or workers:
                idle_since = now
            elif now - idle_since >= idle_exit_s:
                break
            time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        lock.release()
    return 0


# ---------------------------------------------------------------------------------------------
# Queueing, stopping, resuming


def enqueue(
    cfgs: Iterable[RunConfig], runs_dir: str | os.PathLike, *, group: bool | str = True
) -> list[Path]:
    """Creates a queued run per config and makes sure a supervisor runs; returns the folders.

    group=True gives the runs a new shared group id, a string uses that id, False none.
    Every config must pass config.validate_fields (raises ConfigError before creating any).
    """
    cfgs = list(cfgs)
    for cfg in cfgs:
        errors = validate_fields(cfg)
        if errors:
            raise ConfigError(errors)
    if isinstance(group, str):
        group_id = group
    else:
        group_id = store.new_group_id() if group else None
    run_dirs = [store.create_run(cfg, runs_dir, group=group_id) for cfg in cfgs]
    if run_dirs:
        ensure_supervisor(runs_dir)
    return run_dirs


def stop_run(run_dir: str | os.PathLike) -> str:
    """Asks a run to stop; returns what happened: "stopping" (SIGTERM sent; the worker saves
    a checkpoint and ends as stopped), "cancelled" (it was queued) or "not running"."""
    run_dir = Path(run_dir)
    status = store.read_status(run_dir)
    if status.get("state") == "queued":
        return "cancelled" if cancel_run(run_dir) else stop_run(run_dir)
    if status.get("state") != "running":
        return "not running"
    pid = status.get("pid")
    if not process_alive(pid, status.get("pid_started_at")):
        store.read_status(run_dir)  # records the crash
        return "not running"
    store.write_progress(
        run_dir,
        when=lambda s: s.get("state") == "running" and s.get("pid") == pid,
        message="stopping: saving a checkpoint",
        stop_requested_at=time.time(),
    )
    BACKEND.stop(pid)
    return "stopping"


def cancel_run(run_dir: str | os.PathLike) -> bool:
    """Takes a queued run out of the queue (state stopped, "cancelled before it started");
    returns False when it was no longer queued."""
    run_dir = Path(run_dir)
    message = "cancelled before it started"
    after = store.set_state(run_dir, "stopped", when=_is_queued, message=message, cancelled=True)
    if after is not None:
        store.write_summary(run_dir, {"state": "stopped", "message": message})
    return after is not None


def resume_run(
    run_dir: str | os.PathLike, *, start: bool = True, owner_pid: int | None = None
) -> Path:
    """Queues a stopped, crashed or failed run again; returns its folder.

    With a checkpoints/last_state.pt the worker continues from it (status "resume": true),
    otherwise the run starts over. start=True makes sure a supervisor runs; owner_pid
    (the CLI's foreground `resume`) marks it running in that process instead of queued.
    Raises RunError for a run in another state.
    """
    run_dir = Path(run_dir).resolve()
    status = store.read_status(run_dir)
    if status.get("state") not in store.RESUMABLE_STATES:
        raise store.RunError(
            f"run {run_dir.name} is {status.get('state')}; only a stopped, crashed or failed "
            "run can be resumed"
        )
    if not store.can_resume(status):
        raise store.RunError(
            f"run {run_dir.name} failed on its input ({status.get('message')}); a resume "
            "would fail the same way: clone it (Home > Clone into New run), change what the "
            "message names, and launch it again"
        )
    has_checkpoint = (run_dir / "checkpoints" / "last_state.pt").exists()
    fields: dict[str, Any] = {"resume": has_checkpoint, "cancelled": False}
    if owner_pid is not None:
        after = store.set_state(run_dir, "running", pid=owner_pid, message="resuming", **fields)
    else:
        message = (
            "queued to resume from the last checkpoint"
            if has_checkpoint
            else "queued to start again (there is no checkpoint to resume from)"
        )
        after = store.set_state(run_dir, "queued", message=message, **fields)
    if after is None:
        state = store.read_status(run_dir).get("state")
        raise store.RunError(f"run {run_dir.name} changed state to {state}")
    if start and owner_pid is None:
        ensure_supervisor(run_dir.parent)
    return run_dir
