"""The queue: one supervisor per runs folder starts queued runs as worker processes, at most
N at once; and queueing, stopping, cancelling and resuming runs. No torch here.

A run trains in a worker process (`python -m finetune_core worker RUN_DIR`, see worker.py),
never in a thread of the dashboard: closing a tab or restarting the server does not touch
it. One detached supervisor per runs folder (`python -m finetune_core queue`, guarded by an
exclusive lock on runs/.supervisor.lock) starts queued runs oldest first, taking turns
between their owners on a shared server (`fair_order`). It exits
after a minute with nothing to do; `ensure_supervisor` starts it again when needed. How a
worker is started and stopped is the backend's, chosen by FINETUNE_RUNNER: `local` (the
default, LocalProcesses: a detached process on this machine) or `ray` (ray_jobs.RayJobs:
each worker a job on the Ray cluster in RAY_ADDRESS, followed through Ray's Jobs API; the
supervisor itself stays a local process). Ray is imported only with FINETUNE_RUNNER=ray.

Readers only show a dead worker's run as crashed; the supervisor's scan records it (as do
`stop` and `resume` for their run). The supervisor also ends what does not end by itself:
a worker silent for longer than FINETUNE_STALE_S (300 s: no heartbeat, say SIGSTOPped or
hung) gets SIGTERM, then SIGKILL after FINETUNE_STOP_GRACE_S (60 s), and is recorded
crashed ("stopped responding"), so the queue behind it moves on; a worker that was asked
to stop and has not ended a grace period later gets SIGKILL and is recorded stopped
(resumable from its last checkpoint). `stop` starts a supervisor when none runs, so that
escalation happens with or without the dashboard, for CLI runs too. An error on one run
(a full disk, an unreadable file) is logged and the supervisor carries on with the others.

Exit codes of a worker (and of `train` / `resume` in the foreground): 0 completed,
1 failed, 2 invalid input, 130 stopped, 75 the run ended but the disk was too full to
record its final state (the supervisor records it when it can).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Hashable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune_core import store
from finetune_core.config import ConfigError, RunConfig, validate_fields
from finetune_core.store import access, quota
from finetune_core.util.files import (
    LOW_SPACE_BYTES,
    disk_full_message,
    failed_write,
    free_bytes,
    mount_point,
    read_json,
    write_json_atomic,
)
from finetune_core.util.locks import FileLock
from finetune_core.util.processes import send_signal

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_DISK_FULL = 75  # sysexits' EX_TEMPFAIL: the final state could not be written
EXIT_STOPPED = 130

SUPERVISOR_LOCK = ".supervisor.lock"
SETTINGS_FILE = "settings.json"
IDLE_EXIT_S = 60.0
POLL_S = 0.5
STOP_GRACE_S = 60.0  # seconds a worker has to end after SIGTERM before it gets SIGKILL
DISK_FULL_PAUSE_S = 5.0  # seconds the supervisor starts nothing after a full disk refused


def stop_grace_s() -> float:
    """Returns the seconds a worker has to end after SIGTERM before SIGKILL:
    $FINETUNE_STOP_GRACE_S, else 60 s."""
    try:
        value = float(os.environ.get("FINETUNE_STOP_GRACE_S") or STOP_GRACE_S)
    except ValueError:
        return STOP_GRACE_S
    return value if value > 0 else STOP_GRACE_S


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

    name = "local"

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

    def stop(self, pid: int, started_at: float | None = None) -> bool:
        """Asks a worker to stop (SIGTERM: it saves a checkpoint and ends as stopped); returns
        whether the signal went out (never to a pid another process took over)."""
        return send_signal(pid, signal.SIGTERM, started_at)

    def kill(self, pid: int, started_at: float | None = None) -> bool:
        """Ends a worker that does not respond (SIGKILL: it saves nothing)."""
        return send_signal(pid, signal.SIGKILL, started_at)

    def owner(self, proc: subprocess.Popen) -> int:
        """Returns what status.json records as the run's owner: the worker's pid."""
        return proc.pid

    def waiting_message(self, error: BaseException) -> None:
        """A local start never leaves a run waiting on something else."""
        return None


class _Misconfigured(LocalProcesses):
    """FINETUNE_RUNNER names no backend: the supervisor runs, and says why nothing starts."""

    def __init__(self, problem: str):
        super().__init__()
        self.problem = problem

    def start_worker(self, run_dir: Path, parallel: int) -> subprocess.Popen:
        raise store.RunError(self.problem)

    def waiting_message(self, error: BaseException) -> str | None:
        return f"waiting: {error}" if str(error) == self.problem else None


RUNNERS = ("local", "ray")


def backend_from_env(environ: Mapping[str, str] = os.environ) -> LocalProcesses:
    """Returns the backend FINETUNE_RUNNER chooses: local (the default) or ray, which imports
    ray_jobs (and Ray itself only once it submits or follows a job)."""
    name = (environ.get("FINETUNE_RUNNER") or "local").strip().lower()
    if name == "local":
        return LocalProcesses()
    if name == "ray":
        from finetune_core import ray_jobs

        return ray_jobs.RayJobs(
            LocalProcesses(),
            package_root=str(Path(__file__).resolve().parent.parent),
            grace_s=stop_grace_s,
            environ=environ,
        )
    return _Misconfigured(
        f"FINETUNE_RUNNER is {environ.get('FINETUNE_RUNNER')!r}, which is no runner: set it to "
        f"one of {', '.join(RUNNERS)} (local is the default) and start the queue again"
    )


BACKEND = backend_from_env()


def _jobs_backend(status: Mapping[str, Any]) -> Any:
    """Returns the backend that follows a cluster job's run: BACKEND when it is that kind,
    else one made for it (a run that a Ray queue started, stopped from a local shell)."""
    kind = status.get("backend")
    if getattr(BACKEND, "name", None) == kind:
        return BACKEND
    if kind == "ray":
        return backend_from_env({**os.environ, "FINETUNE_RUNNER": "ray"})
    raise store.RunError(f"this finetune_core cannot reach a {kind!r} job; stop it there")


def _signal_worker(status: Mapping[str, Any], *, kill: bool = False) -> bool:
    """Asks a run's worker to stop (kill: ends it) through what started it: a signal to a
    local process, or the cluster's stop_job for a job (which escalates on its own)."""
    job_id = status.get("job_id")
    if job_id is not None:
        return _jobs_backend(status).stop_job(job_id)
    end = BACKEND.kill if kill else BACKEND.stop
    return end(status.get("pid"), status.get("pid_started_at"))


def _owner_key(proc: Any) -> tuple[int | None, str | None]:
    """Returns (pid, job id) of a worker handle: a local process's pid, or a job's id."""
    return getattr(proc, "pid", None), getattr(proc, "job_id", None)


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
    """Starts a worker for a queued run and marks it running with the worker's pid.

    When the status cannot be written (a full disk), the worker just started is ended
    before it could claim the run (it waits for the status lock held here) and the error
    raised: the run stays queued.
    """
    started: list[subprocess.Popen] = []

    def start() -> int | dict[str, Any]:
        started.append(BACKEND.start_worker(run_dir, parallel))
        return BACKEND.owner(started[0])

    try:
        store.set_state(
            run_dir, "running", when=_is_queued, pid=start, message="starting the worker"
        )
    except BaseException:
        for proc in started:
            with contextlib.suppress(OSError):
                proc.kill()
        raise
    return started[0] if started else None


def start_worker(run_dir: str | os.PathLike) -> int | None:
    """Starts a detached worker for a queued run; returns its pid (None for a cluster's job:
    its pid is known on its node once it starts). Raises RunError when the run is not
    queued."""
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


def set_max_parallel(runs_dir: str | os.PathLike, n: int, *, actor: str | None = None) -> None:
    """Sets how many runs the supervisor of runs_dir trains at once (read at every poll): one
    setting for the whole server, which only an admin changes (access.NotAllowed)."""
    if int(n) < 1:
        raise ValueError(f"max parallel runs must be at least 1, got {n}")
    access.check_admin(actor, "change how many runs train at once")
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


def _say(text: str) -> None:
    """Writes a line to the supervisor's log (stdout); a full disk only loses the line."""
    with contextlib.suppress(OSError, ValueError):
        print(f"{datetime.now():%H:%M:%S} {text}", flush=True)


def _owned_by(pid: int | None, job_id: str | None = None) -> Any:
    if job_id is not None:  # a job's worker records its pid on its node
        return lambda s: s.get("state") == "running" and s.get("job_id") == job_id
    return lambda s: s.get("state") == "running" and s.get("pid") == pid


def _unless_final(run_dir: Path, job: Any) -> dict[str, Any] | None:
    """Returns the final state to record for a run whose cluster job ended, None when its
    worker wrote its own (or the run is another owner's now)."""
    status = store.read_status(run_dir)
    if status.get("recorded_state", status.get("state")) != "running":
        return None
    if status.get("job_id") != job.job_id:
        return None
    return job.end_without_final_state(run_dir)


def _disk_full_end(run_dir: Path) -> dict[str, Any]:
    """Returns the final state of a run whose worker could not write its own (exit 75)."""
    message = disk_full_message("the run's final state", run_dir)
    return {"state": "failed", "message": message, "resumable": True, "exit_code": EXIT_DISK_FULL}


def fair_order(
    queued: Iterable[tuple[Hashable, str | None, float]],
    running: Mapping[str | None, int] | None = None,
    last_started: Mapping[str | None, float] | None = None,
) -> list:
    """Returns the keys of queued runs, given as (key, owner, created_at), in the order to
    start them: the owner with the fewest runs training goes first, then the one who started
    a run least recently (never: first), then the one whose run has waited longest; each
    owner's runs oldest first. Every run taken counts as started, so owners take turns.

    One user's sweep of twenty runs queued a minute before another user's single run thus
    delays that run by one run at most, not twenty; with one owner (the local mode: no
    owners) it is plain creation order.
    """
    waiting: dict[str | None, deque] = {}
    for key, owner, created in sorted(queued, key=lambda q: (q[2], str(q[0]))):
        waiting.setdefault(owner, deque()).append((created, key))
    busy = Counter(running or {})
    last = dict(last_started or {})
    turn = max(last.values(), default=0.0)
    order = []
    while waiting:
        owner = min(waiting, key=lambda o: (busy[o], last.get(o, -math.inf), waiting[o][0][0]))
        _, key = waiting[owner].popleft()
        order.append(key)
        if not waiting[owner]:
            del waiting[owner]
        busy[owner] += 1
        turn += 1.0
        last[owner] = turn  # now: later than every start recorded
    return order


class _Kill:
    """A worker the supervisor ends: SIGTERM sent at `since` (by it or by `stop`), SIGKILL
    after the grace period; `end` is what is recorded once the process is gone."""

    def __init__(
        self,
        pid: int,
        started_at: float | None,
        since: float,
        end: dict[str, Any],
        job_id: str | None = None,
    ):
        self.pid, self.started_at, self.since, self.end = pid, started_at, since, end
        self.job_id = job_id  # a cluster's job: identified by it (its pid comes later)
        self.killed = False

    def same_owner(self, pid: int | None, job_id: str | None) -> bool:
        """Returns True when the run's owner now is the worker this kill is for."""
        return self.job_id == job_id and (job_id is not None or self.pid == pid)


class _Queue:
    """What one supervisor keeps between polls: its workers, the workers it ends, final
    states still to be written, and what it already said about unreadable runs."""

    def __init__(self, root: Path, max_parallel: int | None):
        self.root = root
        self.max_parallel = max_parallel
        self.workers: dict[Path, Any] = {}  # local processes, or a cluster's jobs
        self.kills: dict[Path, _Kill] = {}
        self.unwritten: dict[Path, tuple[tuple, dict[str, Any]]] = {}  # final states to write
        self.paused_until = 0.0  # monotonic time before which nothing starts (a full disk)
        self.said: dict[Path, str] = {}
        self.owners: dict[Path, str | None] = {}  # config.json's owner, which never changes

    def owner(self, run_dir: Path) -> str | None:
        """Returns the user a run belongs to (None: a local run, or an unreadable config)."""
        if run_dir not in self.owners:
            try:
                self.owners[run_dir] = access.owner_of(store.read_config(run_dir))
            except (OSError, ValueError):
                return None  # read again at the next poll
        return self.owners[run_dir]

    # one poll: returns whether anything is queued, running or being ended
    def poll(self) -> bool:
        self.reap()
        self.write_unwritten()
        queued, running = self.scan()
        self.start(queued, running)
        return bool(queued or running or self.workers or self.kills or self.unwritten)

    def reap(self) -> None:
        """Records the end of each worker of this supervisor that exited."""
        for run_dir, proc in list(self.workers.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.workers[run_dir]
            kill = self.kills.pop(run_dir, None)
            if kill is not None:
                end = kill.end
            elif code == EXIT_DISK_FULL:
                end = _disk_full_end(run_dir)
            elif hasattr(proc, "end_without_final_state"):  # a job: the cluster says how
                end = _unless_final(run_dir, proc)
            else:
                end = {
                    "state": "crashed",
                    "message": f"{store.CRASHED_MESSAGE} (exit code {code})",
                    "exit_code": code,
                }
            if end is not None:
                self.record(run_dir, _owner_key(proc), end)

    def record(self, run_dir: Path, owner: int | tuple, end: dict[str, Any]) -> None:
        """Writes a final state for the run its dead worker (pid, or (pid, job id)) left
        running; kept to write again at the next poll when the disk refuses it."""
        pid, job_id = owner if isinstance(owner, tuple) else (owner, None)
        fields = dict(end)
        state = fields.pop("state")
        try:
            store.set_state(run_dir, state, when=_owned_by(pid, job_id), **fields)
            self.unwritten.pop(run_dir, None)
        except OSError as e:
            if run_dir not in self.unwritten:
                _say(f"{run_dir.name}: cannot record {state} yet ({e}); trying again")
            self.unwritten[run_dir] = ((pid, job_id), end)

    def write_unwritten(self) -> None:
        for run_dir, (owner, end) in list(self.unwritten.items()):
            self.record(run_dir, owner, end)

    def adopt(self, run_dir: Path, status: dict[str, Any]) -> None:
        """Follows the job of a run that an earlier supervisor submitted to a cluster."""
        try:
            self.workers[run_dir] = _jobs_backend(status).adopt(status["job_id"], run_dir)
        except store.RunError as e:
            self._say_once(run_dir, f"cannot follow its job: {e}")

    def scan(self) -> tuple[list[Path], int]:
        """Returns (queued runs in the order to start them (fair_order), runs with a worker);
        records crashes and ends workers that stopped responding or ignored a stop. One run's
        error is logged and skipped."""
        queued, running = [], 0
        busy: Counter = Counter()  # runs with a worker, per owner
        last_started: dict[str | None, float] = {}
        try:
            run_dirs = [d for d in store.run_dirs(self.root) if store.is_run_dir(d)]
        except OSError as e:
            _say(f"cannot list {self.root}: {e}")
            return [], len(self.workers)
        for run_dir in run_dirs:
            try:
                status = store.read_status(run_dir)
                state = status.get("state")
                if (
                    status.get("job_id") is not None
                    and status.get("recorded_state", state) == "running"
                    and run_dir not in self.workers
                ):
                    self.adopt(run_dir, status)
                owner = self.owner(run_dir)
                started = status.get("started_at")
                if isinstance(started, (int, float)):
                    last_started[owner] = max(started, last_started.get(owner, started))
                if state == store.UNKNOWN:
                    self._say_once(run_dir, status.get("message", ""))
                elif status.get("derived") and state == "crashed":
                    self.found_dead(run_dir, status)
                elif store.is_active(status):
                    running += 1
                    busy[owner] += 1
                    self.watch(run_dir, status)
                elif state == "queued":
                    created = status.get("created_at")
                    created = created if isinstance(created, (int, float)) else 0.0
                    queued.append((run_dir, owner, created))
            except Exception as e:  # noqa: BLE001 - one run's trouble never stops the queue
                self._say_once(run_dir, f"skipped this poll: {type(e).__name__}: {e}")
        return fair_order(queued, busy, last_started), running

    def say_waiting(self, run_dir: Path, message: str | None) -> None:
        """Shows why a queued run waits (the cluster does not answer) in its status.json."""
        if message is None:
            return
        with contextlib.suppress(OSError):
            store.write_progress(
                run_dir,
                when=lambda s: _is_queued(s) and s.get("message") != message,
                message=message,
            )

    def _say_once(self, run_dir: Path, text: str) -> None:
        if self.said.get(run_dir) != text:
            self.said[run_dir] = text
            _say(f"{run_dir.name}: {text}")

    def found_dead(self, run_dir: Path, status: dict[str, Any]) -> None:
        """Records the end of a run whose worker is gone (not one of this supervisor's: reap
        does those, with their exit codes)."""
        if run_dir in self.workers or run_dir in self.unwritten:
            return
        kill = self.kills.pop(run_dir, None)
        if kill is not None:
            self.record(run_dir, kill.pid, kill.end)
            return
        try:
            if store.record_crash(run_dir) is not None:
                _say(f"{run_dir.name}: its worker is gone; recorded crashed")
        except OSError as e:
            self._say_once(run_dir, f"cannot record its crash yet ({e})")

    def watch(self, run_dir: Path, status: dict[str, Any]) -> None:
        """Ends a live worker that stopped responding, or that a stop did not end in time."""
        now, grace = time.time(), stop_grace_s()
        pid, started_at = status.get("pid"), status.get("pid_started_at")
        job_id = status.get("job_id")
        kill = self.kills.get(run_dir)
        if kill is not None and not kill.same_owner(pid, job_id):  # another owns the run now
            del self.kills[run_dir]
            kill = None
        if kill is None:
            asked = store.stop_requested_at(run_dir, status)
            stalled = status.get("state") == store.STALLED
            if asked is not None and (stalled or now - asked >= grace):
                # a stop was asked for (SIGTERM sent then): the grace period runs from it
                message = (
                    f"stopped: the worker (pid {pid}) had not ended {grace:g} s after Stop "
                    "(FINETUNE_STOP_GRACE_S), so it was killed; resume to continue from the "
                    "last checkpoint"
                )
                end = {"state": "stopped", "message": message}
                kill = _Kill(pid, started_at, asked, end, job_id)
            elif stalled:
                silent = store.silent_for_s(status, now) or 0.0
                message = (
                    f"the worker (pid {pid}) stopped responding: no heartbeat for {silent:.0f} s "
                    f"(FINETUNE_STALE_S {store.stale_after_s():g} s), so the queue's supervisor "
                    "ended it; resume to continue from the last checkpoint"
                )
                kill = _Kill(pid, started_at, now, {"state": "crashed", "message": message}, job_id)
                _signal_worker(status)
                _say(f"{run_dir.name}: worker {pid} stopped responding; SIGTERM")
            else:
                return
            self.kills[run_dir] = kill
        if not kill.killed and now - kill.since >= grace:
            kill.killed = True
            _signal_worker(status, kill=True)
            _say(f"{run_dir.name}: worker {pid} did not end {grace:g} s after SIGTERM; SIGKILL")

    def start(self, queued: list[Path], running: int) -> None:
        if not queued or time.monotonic() < self.paused_until:
            return
        free = free_bytes(self.root)
        if free is not None and free < LOW_SPACE_BYTES:  # a run could not even write its status
            self._say_once(
                self.root,
                f"the disk is full (less than {LOW_SPACE_BYTES >> 20} MiB free on "
                f"{mount_point(self.root)}): queued runs wait until there is space",
            )
            return
        self.said.pop(self.root, None)
        limit = parallel_limit(self.root, self.max_parallel)
        for run_dir in queued[: max(limit - running, 0)]:
            try:
                proc = _start_queued(run_dir, limit)
            except OSError as e:
                self.paused_until = time.monotonic() + DISK_FULL_PAUSE_S
                _say(f"cannot start {run_dir.name} ({e}); trying again in {DISK_FULL_PAUSE_S:g} s")
                return
            except Exception as e:  # noqa: BLE001 - this run's trouble, not the queue's
                self._say_once(run_dir, f"cannot start it: {type(e).__name__}: {e}")
                self.say_waiting(run_dir, BACKEND.waiting_message(e))
                continue
            if proc is not None:
                self.workers[run_dir] = proc
                _say(f"started {run_dir.name}")


def supervise(
    runs_dir: str | os.PathLike,
    max_parallel: int | None = None,
    *,
    idle_exit_s: float = IDLE_EXIT_S,
    poll_s: float = POLL_S,
) -> int:
    """Runs the queue of runs_dir until idle for idle_exit_s; returns 0.

    Returns at once when another supervisor holds the lock. Runs started by a foreground
    `train` count against the limit too. An error in one poll (a full disk) is logged and
    the next poll tries again.
    """
    root = Path(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / SUPERVISOR_LOCK)
    if not lock.try_acquire():
        print(f"a supervisor already runs for {root}", file=sys.stderr)
        return 0
    with contextlib.suppress(OSError):
        lock.write_owner(f"{os.getpid()}\n")
    stopping = []
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):
            previous[sig] = signal.signal(sig, lambda *_: stopping.append(True))
    queue = _Queue(root, max_parallel)
    idle_since = time.monotonic()
    _say(f"supervisor pid {os.getpid()} watches {root}")
    try:
        while not stopping:
            try:
                busy = queue.poll()
            except Exception as e:  # noqa: BLE001 - the queue outlives one bad poll
                _say(f"poll failed: {type(e).__name__}: {e}")
                busy = True
            now = time.monotonic()
            if busy:
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
    cfgs: Iterable[RunConfig],
    runs_dir: str | os.PathLike,
    *,
    group: bool | str = True,
    owner: str | None = None,
) -> list[Path]:
    """Creates a queued run per config and makes sure a supervisor runs; returns the folders.

    group=True gives the runs a new shared group id, a string uses that id, False none.
    Every config must pass config.validate_fields (raises ConfigError before creating any).
    `owner` (the signed-in user; None in the local mode) is recorded in each config.json;
    the launch is refused as a whole (access.NotAllowed, no run created) in a read-only
    demo, past the owner's limits of queued runs or disk, or on another user's upload
    (quota.check_launch).
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
    specs = [spec for cfg in cfgs for spec in (cfg.data, cfg.weights)]
    access.refuse_in_demo("launch runs")
    with contextlib.ExitStack() as held:
        if owner is not None:  # the check and the runs it allows are one step
            held.enter_context(quota.launch_lock(runs_dir))
            quota.check_launch(runs_dir, owner, len(cfgs), specs)
        run_dirs = [store.create_run(cfg, runs_dir, group=group_id, owner=owner) for cfg in cfgs]
    if run_dirs:
        ensure_supervisor(runs_dir)
    return run_dirs


def stop_run(run_dir: str | os.PathLike, *, actor: str | None = None) -> str:
    """Asks a run to stop; returns what happened: "stopping" (SIGTERM sent; the worker saves
    a checkpoint and ends as stopped), "cancelled" (it was queued) or "not running".

    Makes sure the runs folder's supervisor runs: when the worker has not ended
    stop_grace_s() after the first Stop (a hung or SIGSTOPped process), it gets SIGKILL
    there and the run is recorded stopped, resumable from its last checkpoint. A worker
    found dead here is recorded crashed. Another user's run is refused (access.NotAllowed).
    """
    run_dir = Path(run_dir)
    store.check_action(run_dir, actor, access.STOP)
    status = store.read_status(run_dir)
    state = status.get("state")
    if state == "queued":
        return "cancelled" if cancel_run(run_dir, actor=actor) else stop_run(run_dir, actor=actor)
    if status.get("derived") and state == "crashed":
        with contextlib.suppress(OSError):
            store.record_crash(run_dir)
        return "not running"
    if not store.is_active(status):
        return "not running"
    pid, started_at = status.get("pid"), status.get("pid_started_at")
    if store.stop_requested_at(run_dir, status) is None:  # the grace runs from the first Stop
        if status.get("job_id") is None:
            store.request_stop(run_dir, pid, started_at)
        else:
            store.request_stop(run_dir, pid, started_at, status["job_id"])
    _signal_worker(status)
    with contextlib.suppress(OSError):
        ensure_supervisor(run_dir.resolve().parent)
    return "stopping"


def group_runs(runs_dir: str | os.PathLike, group: str) -> list[Path]:
    """Returns the run folders of a group (the `group` in their config.json), oldest first."""
    found = []
    for run_dir in store.run_dirs(Path(runs_dir)):
        if store.is_run_dir(run_dir) and store.read_config(run_dir).get("group") == group:
            found.append(run_dir)
    return sorted(found, key=lambda d: d.name)


def stop_group(
    runs_dir: str | os.PathLike,
    group: str,
    *,
    cancel_only: bool = False,
    actor: str | None = None,
) -> dict:
    """Stops a group as a whole: its queued runs are cancelled first (so that the queue
    starts none of them), then its running ones are stopped, unless cancel_only. Returns
    {run id: what happened} ("cancelled", "stopping", "not running"); RunError when no run
    has that group, access.NotAllowed (nothing done) when one of them is another user's."""
    members = group_runs(runs_dir, group)
    if not members:
        raise store.RunError(f"no run of group {group!r} in {runs_dir}")
    doing = access.CANCEL if cancel_only else access.STOP
    for d in members:
        store.check_action(d, actor, doing)
    outcome = {
        d.name: ("cancelled" if cancel_run(d, actor=actor) else "not running") for d in members
    }
    if not cancel_only:
        for d in members:
            if outcome[d.name] != "cancelled":
                outcome[d.name] = stop_run(d, actor=actor)
    return outcome


def cancel_run(run_dir: str | os.PathLike, *, actor: str | None = None) -> bool:
    """Takes a queued run out of the queue (state stopped, "cancelled before it started");
    returns False when it was no longer queued. Another user's run is refused
    (access.NotAllowed)."""
    run_dir = Path(run_dir)
    store.check_action(run_dir, actor, access.CANCEL)
    message = "cancelled before it started"
    after = store.set_state(run_dir, "stopped", when=_is_queued, message=message, cancelled=True)
    if after is not None:
        store.write_summary(run_dir, {"state": "stopped", "message": message})
    return after is not None


def _already_running(run_dir: Path, status: dict[str, Any]) -> store.RunError:
    pid = status.get("pid")
    if status.get("state") == "queued":
        return store.RunError(f"run {run_dir.name} is already queued; nothing to resume")
    hint = "; it does not respond: stop it first" if status.get("state") == store.STALLED else ""
    where = f"pid {pid}"
    if status.get("job_id") is not None:  # a cluster's job: its pid is known on its node
        where = f"Ray job {status['job_id']}" + (f", pid {pid} on {status['host']}" if pid else "")
    return store.RunError(
        f"run {run_dir.name} is already running ({where}){hint}; resume it once it has stopped"
    )


def _disk_full_refusal(run_dir: Path, error: OSError, doing: str) -> store.RunError | None:
    """Returns the RunError that says a full disk refused `doing`, or None for another error."""
    if not failed_write(error)[0]:
        return None
    return store.RunError(
        f"cannot {doing} run {run_dir.name}: "
        + disk_full_message(f"{run_dir.name}/status.json", run_dir, then=f"{doing} it again")
    )


def resume_run(
    run_dir: str | os.PathLike,
    *,
    start: bool = True,
    owner_pid: int | None = None,
    actor: str | None = None,
) -> Path:
    """Queues a stopped, crashed or failed run again; returns its folder.

    With a checkpoints/last_state.pt the worker continues from it (status "resume": true),
    otherwise the run starts over. start=True makes sure a supervisor runs; owner_pid
    (the CLI's foreground `resume`) marks it running in that process instead of queued.
    A run whose worker is gone is recorded crashed first. Raises RunError for a run in
    another state ("already running (pid N)" for one that trains in another process), and
    for a full disk; access.NotAllowed for another user's run, or past the actor's limits
    of queued runs or disk.
    """
    run_dir = Path(run_dir).resolve()
    store.check_action(run_dir, actor, access.RESUME)
    if actor is not None and owner_pid is None:
        with quota.launch_lock(run_dir.parent):
            quota.check_launch(run_dir.parent, actor, 1)
            return resume_run(run_dir, start=start)
    try:
        return _resume(run_dir, start=start, owner_pid=owner_pid)
    except OSError as e:
        refusal = _disk_full_refusal(run_dir, e, "resume")
        if refusal is None:
            raise
        raise refusal from e


def _resume(run_dir: Path, *, start: bool, owner_pid: int | None) -> Path:
    status = store.read_status(run_dir)
    if status.get("derived") and status.get("state") == "crashed":
        store.record_crash(run_dir)
        status = store.read_status(run_dir)
    if store.is_active(status) or status.get("state") == "queued":
        raise _already_running(run_dir, status)
    if status.get("state") == store.UNKNOWN:
        raise store.RunError(f"run {run_dir.name} cannot be resumed: {status.get('message')}")
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
    if after is None:  # another process resumed it between our read and our write
        now = store.read_status(run_dir)
        if store.is_active(now) or now.get("state") == "queued":
            raise _already_running(run_dir, now)
        raise store.RunError(f"run {run_dir.name} changed state to {now.get('state')}")
    if start and owner_pid is None:
        ensure_supervisor(run_dir.parent)
    return run_dir
