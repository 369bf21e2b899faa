"""Worker processes, the queue supervisor, and stop / cancel / resume.

A run trains in a worker process (`python -m finetune_core worker RUN_DIR`), never in a
thread of the dashboard: closing a tab or restarting the server does not touch it. One
detached supervisor per runs folder (`python -m finetune_core queue`, guarded by an
exclusive lock on runs/.supervisor.lock) starts queued runs in creation order, at most N
at once, and marks runs whose worker vanished as crashed. It exits after a minute with
nothing to do; `ensure_supervisor` starts it again when needed.

Exit codes of a worker (and of `train` / `resume` in the foreground): 0 completed,
1 failed, 2 invalid input, 130 stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune_core import store
from finetune_core.config import ConfigError, RunConfig, validate_fields

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_STOPPED = 130

SUPERVISOR_LOCK = ".supervisor.lock"
SETTINGS_FILE = "settings.json"
IDLE_EXIT_S = 60.0
POLL_S = 0.5

_children: list[subprocess.Popen] = []  # processes this process started, reaped when done


class StopRequested(BaseException):
    """SIGTERM/SIGINT arrived before training began (while loading data or weights).

    A BaseException, so that no `except Exception` in data or weights code swallows it.
    """


# ---------------------------------------------------------------------------------------------
# Signals and callbacks used by the worker


class StopFlag:
    """Set by SIGTERM/SIGINT; the training loop checks it after every optimizer step.

    A second Ctrl-C raises KeyboardInterrupt at once, for a user who does not want to wait
    for the checkpoint.
    """

    def __init__(self):
        self.requested = False
        self.signals = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.requested = True
        self.signals += 1
        if signum == signal.SIGINT and self.signals > 1:
            raise KeyboardInterrupt

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        self._previous.clear()


class StopCallback(store._Callback):
    """Raises engine.StopTraining after the step during which a stop was requested."""

    def __init__(self, flag: StopFlag):
        self.flag = flag

    def on_batch_end(self, trainer) -> None:
        if self.flag.requested:
            from finetune_core import engine

            raise engine.StopTraining("stop requested (SIGTERM or Ctrl-C)")


def _plan_counts(trainer) -> dict[str, Any]:
    plan = getattr(trainer, "plan", None)
    if plan is None:
        return {}
    counts: dict[str, Any] = {"total_params": getattr(plan, "total_params", None)}
    phases = getattr(plan, "phases", None) or []
    trainable = [getattr(p, "trainable_params", None) for p in phases]
    trainable = [t for t in trainable if t is not None]
    if trainable:
        counts["trainable_params"] = max(trainable)  # gradual / lp_ft: the widest phase
    return counts


class StatusCallback(store._Callback):
    """Keeps status.json's epoch, step, total_steps, phase and eta_s current (<= 2 writes/s)."""

    def __init__(self, run_dir: str | os.PathLike, min_interval_s: float = 0.5):
        self.run_dir = Path(run_dir)
        self.min_interval_s = min_interval_s
        self._last_write = 0.0
        self._t0 = time.monotonic()
        self._step0 = 0
        self.epoch = 0
        self.step = 0

    def _progress(self, trainer) -> dict[str, Any]:
        step = int(getattr(trainer, "step", 0) or 0)
        total = getattr(trainer, "total_steps", None)
        eta = None
        done = step - self._step0
        if total and done > 0:
            eta = (time.monotonic() - self._t0) / done * max(int(total) - step, 0)
        return {
            "epoch": int(getattr(trainer, "epoch", 0) or 0),
            "epochs": getattr(getattr(trainer, "cfg", None), "epochs", None),
            "step": step,
            "total_steps": total,
            "phase": getattr(trainer, "phase", None),
            "eta_s": None if eta is None else round(eta, 1),
        }

    def on_fit_start(self, trainer) -> None:
        self._t0 = time.monotonic()
        self._step0 = int(getattr(trainer, "step", 0) or 0)
        fields = self._progress(trainer)
        fields.update(_plan_counts(trainer))
        fields["message"] = "training"
        store.write_status(self.run_dir, **fields)
        self._last_write = time.monotonic()

    def on_batch_end(self, trainer) -> None:
        self.epoch, self.step = trainer.epoch, trainer.step
        now = time.monotonic()
        if now - self._last_write >= self.min_interval_s:
            store.write_status(self.run_dir, **self._progress(trainer))
            self._last_write = now

    def on_fit_end(self, trainer, summary) -> None:
        # the exact counters at the end (a stop lands between two throttled writes)
        store.write_status(self.run_dir, **self._progress(trainer))

    def on_epoch_end(self, trainer, record) -> None:
        fields = self._progress(trainer)
        if record and record.get("split") == "val" and record.get("acc") is not None:
            epochs = fields.get("epochs")
            fields["message"] = (
                f"epoch {fields['epoch']}/{epochs}: val acc {100 * record['acc']:.1f} %, "
                f"val loss {record.get('loss', float('nan')):.4f}"
            )
        store.write_status(self.run_dir, **fields)
        self._last_write = time.monotonic()


class _LogCallback(store._Callback):
    """Writes each val and test record into worker.log (the progress bar is not logged)."""

    def __init__(self, log: _Log):
        self.log = log

    def on_fit_start(self, trainer) -> None:
        self.log(
            f"training: {getattr(trainer, 'total_steps', '?')} steps, "
            f"phase {getattr(trainer, 'phase', '?')}, from step {getattr(trainer, 'step', 0)}"
        )

    def on_epoch_end(self, trainer, record) -> None:
        if record:
            self.log(
                f"{record.get('split')} epoch {record.get('epoch')} step {record.get('step')}: "
                f"loss {record.get('loss', float('nan')):.4f}, acc {record.get('acc', 0):.4f}"
            )


class _Log:
    """Appends timestamped lines to worker.log; echo also prints them to stderr (foreground)."""

    def __init__(self, path: Path, echo: bool):
        self.path = path
        self.echo = echo

    def __call__(self, message: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {message}\n")
        if self.echo:
            print(message, file=sys.stderr, flush=True)

    def traceback(self) -> None:
        with open(self.path, "a") as f:
            f.write(traceback.format_exc())


def _progress_reporter(run_dir: Path, flag: StopFlag, log: _Log) -> Callable:
    """Returns the progress(stage, fraction, message) for prepare(): status.message, <= 2/s."""
    last = {"write": 0.0, "logged": "", "log_time": 0.0}

    def progress(stage: str, fraction: float | None, message: str) -> None:
        if flag.requested:
            raise StopRequested
        now = time.monotonic()
        if now - last["write"] >= 0.5 or fraction in (0.0, 1.0):
            store.write_status(run_dir, message=message, stage=stage, stage_fraction=fraction)
            last["write"] = now
        if stage != last["logged"] or now - last["log_time"] >= 10 or fraction == 1.0:
            log(message)
            last["logged"], last["log_time"] = stage, now

    return progress


def _failure_message(error: BaseException) -> str:
    name = type(error).__name__
    if name == "OutOfMemoryError":
        return (
            f"out of memory: {error}. Lower --batch-size or --image-size, or pick a smaller model"
        )
    if type(error).__module__.startswith("finetune_core"):
        return str(error) or name
    return f"{name}: {error} (the traceback is in worker.log)"


# ---------------------------------------------------------------------------------------------
# The worker


def _claim(run_dir: Path) -> dict[str, Any]:
    """Marks the run as running in this process when it is queued or already ours."""
    me = os.getpid()

    def claim(status):
        mine = status.get("state") == "running" and status.get("pid") == me
        if status.get("state") != "queued" and not mine:
            return None
        return {
            "state": "running",
            "pid": me,
            "pid_started_at": store.process_start_time(me),
            "started_at": time.time(),
            "finished_at": None,
            "exit_code": None,
            "epoch": status.get("epoch", 0) if status.get("resume") else 0,
            "step": status.get("step", 0) if status.get("resume") else 0,
            "eta_s": None,
            "stop_requested_at": None,
            "message": "preparing data and model",
        }

    return store.update_status(run_dir, claim)


def run_worker(run_dir: str | os.PathLike, *, callbacks: Iterable = (), echo: bool = False) -> int:
    """Trains a queued run (or one created for this process) to a final state; returns the
    exit code: 0 completed, 1 failed, 2 not runnable, 130 stopped.

    Writes status.json (running, progress, final state), metrics.jsonl, checkpoints/,
    summary.json and worker.log. SIGTERM or Ctrl-C stops after the current step with a
    checkpoint. The CLI's `train` and `resume` call this in the foreground with echo=True
    and a progress-bar callback; the supervisor runs it as `python -m finetune_core worker`.
    """
    run_dir = Path(run_dir).resolve()
    if not store._is_run_dir(run_dir):
        print(f"error: {run_dir} is not a run folder (no config.json/status.json)", file=sys.stderr)
        return EXIT_INVALID
    log = _Log(run_dir / "worker.log", echo)
    status = _claim(run_dir)
    if status.get("pid") != os.getpid() or status.get("state") != "running":
        message = (
            f"run {run_dir.name} is {status.get('state')}, so it was not started; "
            "only a queued run can be started (resume a stopped, crashed or failed run)"
        )
        print(f"error: {message}", file=sys.stderr)
        return EXIT_INVALID
    resume = bool(status.get("resume")) and (run_dir / "checkpoints" / "last_state.pt").exists()
    log(f"worker pid {os.getpid()} starts run {run_dir.name}" + (" (resume)" if resume else ""))

    flag = StopFlag()
    flag.install()
    metrics = store.MetricsWriter(run_dir)
    exp = None
    summary: dict[str, Any] = {}
    try:
        cfg = store.run_config(run_dir)
        errors = validate_fields(cfg)
        if errors:
            raise ConfigError(errors)
        from finetune_core import engine

        exp = engine.prepare(
            cfg, runs_dir=run_dir.parent, progress=_progress_reporter(run_dir, flag, log)
        )
        if flag.requested:
            raise StopRequested
        store.write_status(run_dir, message="training")
        status_callback = StatusCallback(run_dir)
        summary = engine.fit(
            exp,
            callbacks=[
                metrics,
                status_callback,
                StopCallback(flag),
                _LogCallback(_Log(log.path, echo=False)),
                *callbacks,
            ],
            checkpoint_dir=run_dir / "checkpoints",
            resume=resume,
        )
        state = summary.get("state") or "completed"
        if state == "stopped":
            message = (
                f"stopped at epoch {status_callback.epoch}, step {status_callback.step}; "
                "resume to continue from the last checkpoint"
            )
        else:
            message = _completed_message(summary)
    except StopRequested:
        state, message = "stopped", "stopped before training started; resume to start it again"
    except KeyboardInterrupt:
        state, message = "stopped", "interrupted; resume to continue from the last checkpoint"
        log.traceback()
    except Exception as error:  # noqa: BLE001 - every failure must end as a final state
        if type(error).__name__ == "StopTraining":  # raised outside the loop's own handler
            state, message = "stopped", "stopped; resume to continue from the last checkpoint"
        else:
            state, message = "failed", _failure_message(error)
        log.traceback()
    finally:
        metrics.close()

    try:
        _finish_run(run_dir, exp, summary, state, message)
    finally:
        flag.restore()  # only now: a SIGTERM while the final state is written must not kill it
    return exit_code(state)


def exit_code(state: str) -> int:
    """Returns the process exit code of a final state: 0 completed, 130 stopped, else 1."""
    return {"completed": EXIT_COMPLETED, "stopped": EXIT_STOPPED}.get(state, EXIT_FAILED)


def _finish_run(run_dir: Path, exp, summary: dict[str, Any], state: str, message: str) -> None:
    """Writes summary.json, then the final status (readers that see it find the summary)."""
    summary = dict(summary)
    summary["state"] = state
    summary["message"] = message
    summary["skipped_files"] = list(getattr(getattr(exp, "data", None), "skipped_files", []) or [])
    if summary.get("best_val_acc") is None:
        summary["best_val_acc"] = store._best_val_from_metrics(run_dir)
    store.write_summary(run_dir, summary)
    store.write_status(
        run_dir,
        state=state,
        message=message,
        finished_at=time.time(),
        exit_code=exit_code(state),
        eta_s=None,
    )
    _Log(run_dir / "worker.log", echo=False)(
        message if message.startswith(state) else f"{state}: {message}"
    )


def _completed_message(summary: dict[str, Any]) -> str:
    parts = []
    for key, label in (("best_val_acc", "best val acc"), ("test_acc", "test acc")):
        value = summary.get(key)
        if value is not None:
            parts.append(f"{label} {100 * value:.1f} %")
    if summary.get("train_time_s") is not None:
        parts.append(f"{summary['train_time_s']:.1f} s")
    return "completed" + (": " + ", ".join(parts) if parts else "")


# ---------------------------------------------------------------------------------------------
# Detached processes


def _child_env() -> dict[str, str]:
    """Returns the environment for a detached child: finetune_core importable from anywhere."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if package_root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([package_root, *paths])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _reap() -> None:
    for proc in list(_children):
        if proc.poll() is not None:
            _children.remove(proc)


def _spawn(
    args: list[str], log_path: Path, cwd: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Starts `python -m finetune_core ARGS` in its own session, output appended to log_path."""
    _reap()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_core", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**_child_env(), **(extra_env or {})},
            start_new_session=True,  # no SIGINT/SIGHUP from the terminal or server that started it
        )
    _children.append(proc)
    return proc


def worker_threads(parallel: int) -> dict[str, str]:
    """Returns the environment that gives each of `parallel` CPU workers its share of the cores
    (torch's default is every core per process, which oversubscribes them); {} for one worker
    or when the user set OMP_NUM_THREADS."""
    if parallel <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}


def _start_queued(run_dir: Path, parallel: int = 1) -> subprocess.Popen | None:
    """Starts a worker for a queued run and marks it running with the worker's pid."""
    started: list[subprocess.Popen] = []

    def start(status):
        if status.get("state") != "queued":
            return None
        proc = _spawn(
            ["worker", str(run_dir)], run_dir / "worker.log", run_dir, worker_threads(parallel)
        )
        started.append(proc)
        return {
            "state": "running",
            "pid": proc.pid,
            "pid_started_at": store.process_start_time(proc.pid),
            "started_at": time.time(),
            "message": "starting the worker",
        }

    store.update_status(run_dir, start)
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


def read_settings(runs_dir: str | os.PathLike) -> dict[str, Any]:
    """Returns runs_dir/settings.json ({} when absent)."""
    data = store.read_json(Path(runs_dir) / SETTINGS_FILE)
    return data if isinstance(data, dict) else {}


def set_max_parallel(runs_dir: str | os.PathLike, n: int) -> None:
    """Sets how many runs the supervisor of runs_dir trains at once (read at every poll)."""
    if int(n) < 1:
        raise ValueError(f"max parallel runs must be at least 1, got {n}")
    root = Path(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    settings = read_settings(root)
    settings["max_parallel"] = int(n)
    store.write_json_atomic(root / SETTINGS_FILE, settings)


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


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def supervisor_running(runs_dir: str | os.PathLike) -> bool:
    """Returns True when a supervisor holds the lock of runs_dir."""
    root = Path(runs_dir)
    if not (root / SUPERVISOR_LOCK).exists():
        return False
    fd = _try_lock(root / SUPERVISOR_LOCK)
    if fd is None:
        return True
    os.close(fd)
    return False


def ensure_supervisor(runs_dir: str | os.PathLike, max_parallel: int | None = None) -> bool:
    """Starts a detached supervisor for runs_dir unless one runs; returns True when started."""
    root = Path(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if supervisor_running(root):
        return False
    args = ["queue", "--runs-dir", str(root)]
    if max_parallel is not None:
        args += ["--max-parallel", str(int(max_parallel))]
    _spawn(args, root / "supervisor.log", root)
    return True


def _scan(root: Path) -> tuple[list[Path], int]:
    """Returns (queued runs oldest first, number of running runs); marks orphans crashed."""
    queued, running = [], 0
    for run_dir in store._run_dirs(root):
        if not store._is_run_dir(run_dir):
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
    lock_fd = _try_lock(root / SUPERVISOR_LOCK)
    if lock_fd is None:
        print(f"a supervisor already runs for {root}", file=sys.stderr)
        return 0
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n".encode())
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
                if code is None:
                    continue
                del workers[run_dir]
                with contextlib.suppress(OSError):
                    store.update_status(
                        run_dir,
                        lambda s, pid=proc.pid, code=code: (
                            {
                                "state": "crashed",
                                "message": f"{store.CRASHED_MESSAGE} (exit code {code})",
                                "finished_at": time.time(),
                                "exit_code": code,
                            }
                            if s.get("state") == "running" and s.get("pid") == pid
                            else None
                        ),
                    )
            queued, running = _scan(root)
            limit = parallel_limit(root, max_parallel)
            free = limit - running
            for run_dir in queued[: max(free, 0)]:
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
        os.close(lock_fd)
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
    if not store.process_alive(pid, status.get("pid_started_at")):
        store.read_status(run_dir)
        return "not running"
    store.update_status(
        run_dir,
        lambda s: (
            {"message": "stopping: saving a checkpoint", "stop_requested_at": time.time()}
            if s.get("state") == "running" and s.get("pid") == pid
            else None
        ),
    )
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    return "stopping"


def cancel_run(run_dir: str | os.PathLike) -> bool:
    """Takes a queued run out of the queue (state stopped, "cancelled before it started");
    returns False when it was no longer queued."""
    run_dir = Path(run_dir)
    done = []

    def cancel(status):
        if status.get("state") != "queued":
            return None
        done.append(True)
        return {
            "state": "stopped",
            "message": "cancelled before it started",
            "finished_at": time.time(),
            "cancelled": True,
        }

    status = store.update_status(run_dir, cancel)
    if done:
        store.write_summary(run_dir, {"state": "stopped", "message": status["message"]})
    return bool(done)


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
    has_checkpoint = (run_dir / "checkpoints" / "last_state.pt").exists()

    def requeue(s):
        if s.get("state") not in store.RESUMABLE_STATES:
            return None
        fields = {
            "state": "queued",
            "resume": has_checkpoint,
            "cancelled": False,
            "stop_requested_at": None,
            "pid": None,
            "pid_started_at": None,
            "finished_at": None,
            "exit_code": None,
            "eta_s": None,
            "message": "queued to resume from the last checkpoint"
            if has_checkpoint
            else "queued to start again (there is no checkpoint to resume from)",
        }
        if owner_pid is not None:
            fields.update(
                state="running",
                pid=owner_pid,
                pid_started_at=store.process_start_time(owner_pid),
                message="resuming",
            )
        return fields

    after = store.update_status(run_dir, requeue)
    if after.get("state") not in ("queued", "running"):
        raise store.RunError(f"run {run_dir.name} changed state to {after.get('state')}")
    if start and owner_pid is None:
        ensure_supervisor(run_dir.parent)
    return run_dir
