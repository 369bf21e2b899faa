"""The worker: trains one run to a final state in this process (`python -m finetune_core
worker RUN_DIR`, started by the supervisor; the CLI's `train` and `resume` run it in the
foreground).

It claims the queued run, makes sure its weights can be had (pretraining the builtin ones
on first use), prepares data and model, and fits with callbacks that keep status.json,
metrics.jsonl and worker.log current. SIGTERM or Ctrl-C stops after the current step
with a checkpoint. Whatever happens, the run ends with summary.json and a final state.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune_core import data, engine, estimate, jobs, pretrain, store, uploads, weights
from finetune_core.callbacks import Callback, StopTraining
from finetune_core.config import ConfigError, validate_fields
from finetune_core.device import DeviceError
from finetune_core.runner import EXIT_INVALID, exit_code
from finetune_core.util.durations import Eta

# Failures that come from the run's own input (data, weights, settings, a diverging loss): a
# resume would repeat them, so the run is not offered one; a clone with the input fixed is.
INPUT_FAILURES = (
    data.DataError,
    weights.WeightsError,
    ConfigError,
    DeviceError,
    engine.TrainingFailed,
)


class StopRequested(BaseException):
    """SIGTERM/SIGINT arrived before training began (while loading data or weights).

    A BaseException, so that no `except Exception` in data or weights code swallows it.
    """


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


class StopCallback(Callback):
    """Raises StopTraining after the step during which a stop was requested."""

    def __init__(self, flag: StopFlag):
        self.flag = flag

    def on_batch_end(self, trainer) -> None:
        if self.flag.requested:
            raise StopTraining("stop requested (SIGTERM or Ctrl-C)")


class StatusCallback(Callback):
    """Keeps status.json's epoch, step, total_steps, phase and eta_s current (<= 2 writes/s)."""

    def __init__(self, run_dir: str | os.PathLike, min_interval_s: float = 0.5):
        self.run_dir = Path(run_dir)
        self.min_interval_s = min_interval_s
        self._last_write = 0.0
        self.eta = Eta()
        self.epoch = 0
        self.step = 0

    def _progress(self, trainer) -> dict[str, Any]:
        eta = self.eta.left(trainer.step, trainer.total_steps)
        return {
            "epoch": trainer.epoch,
            "epochs": trainer.cfg.epochs,
            "step": trainer.step,
            "total_steps": trainer.total_steps,
            "phase": trainer.phase,
            "eta_s": None if eta is None else round(eta, 1),
        }

    def _write(self, **fields) -> None:
        store.write_progress(self.run_dir, **fields)
        self._last_write = time.monotonic()

    def on_fit_start(self, trainer) -> None:
        self.eta.start(trainer.step)
        plan = trainer.plan
        self._write(
            **self._progress(trainer),
            total_params=plan.total_params,
            trainable_params=max(p.trainable_params for p in plan.phases),  # the widest phase
            message="training",
        )

    def on_batch_end(self, trainer) -> None:
        self.epoch, self.step = trainer.epoch, trainer.step
        if time.monotonic() - self._last_write >= self.min_interval_s:
            self._write(**self._progress(trainer))

    def on_epoch_end(self, trainer, record) -> None:
        fields = self._progress(trainer)
        fields["message"] = (
            f"epoch {fields['epoch']}/{fields['epochs']}: val acc {100 * record['acc']:.1f} %, "
            f"val loss {record['loss']:.4f}"
        )
        self._write(**fields)

    def on_fit_end(self, trainer, summary) -> None:
        # the exact counters at the end (a stop lands between two throttled writes)
        self._write(**self._progress(trainer))


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


class LogCallback(Callback):
    """Writes each val and test record into worker.log (the progress bar is not logged)."""

    def __init__(self, log: _Log):
        self.log = log

    def on_fit_start(self, trainer) -> None:
        self.log(
            f"training: {trainer.total_steps} steps, phase {trainer.phase}, "
            f"from step {trainer.step}"
        )

    def on_eval_record(self, trainer, record) -> None:
        self.log(
            f"{record['split']} epoch {record['epoch']} step {record['step']}: "
            f"loss {record['loss']:.4f}, acc {record['acc']:.4f}"
        )


def _progress_reporter(run_dir: Path, flag: StopFlag, log: _Log) -> Callable:
    """Returns the progress(stage, fraction, message) for preparation: status.message (<= 2 a
    second) and worker.log."""
    last = {"write": 0.0, "logged": "", "log_time": 0.0}

    def progress(stage: str, fraction: float | None, message: str) -> None:
        if flag.requested:
            raise StopRequested
        now = time.monotonic()
        if now - last["write"] >= 0.5 or fraction in (0.0, 1.0):
            store.write_progress(run_dir, message=message, stage=stage, stage_fraction=fraction)
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


def _claim(run_dir: Path) -> dict[str, Any] | None:
    """Marks the run as running in this process when it is queued or already started for it;
    returns the status after, or None when the run is not this worker's to train."""
    me = os.getpid()

    def mine_to_take(status: dict[str, Any]) -> bool:
        state = status.get("state")
        return state == "queued" or (state == "running" and status.get("pid") == me)

    before = store.read_status(run_dir)
    resuming = bool(before.get("resume"))
    return store.set_state(
        run_dir,
        "running",
        when=mine_to_take,
        pid=me,
        epoch=before.get("epoch", 0) if resuming else 0,
        step=before.get("step", 0) if resuming else 0,
        message="preparing data and model",
    )


def run_worker(run_dir: str | os.PathLike, *, callbacks: Iterable = (), echo: bool = False) -> int:
    """Trains a queued run (or one created for this process) to a final state; returns the
    exit code: 0 completed, 1 failed, 2 not runnable, 130 stopped.

    Writes status.json (running, progress, final state), metrics.jsonl, checkpoints/,
    summary.json and worker.log. SIGTERM or Ctrl-C stops after the current step with a
    checkpoint. The CLI's `train` and `resume` call this in the foreground with echo=True
    and a progress-bar callback; the supervisor runs it as `python -m finetune_core worker`.
    """
    run_dir = Path(run_dir).resolve()
    if not store.is_run_dir(run_dir):
        print(f"error: {run_dir} is not a run folder (no config.json/status.json)", file=sys.stderr)
        return EXIT_INVALID
    log = _Log(run_dir / "worker.log", echo)
    status = _claim(run_dir)
    if status is None:
        state = store.read_status(run_dir).get("state")
        message = (
            f"run {run_dir.name} is {state}, so it was not started; "
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
    resumable = True
    try:
        cfg = store.run_config(run_dir)
        errors = validate_fields(cfg)
        if errors:
            raise ConfigError(errors)
        progress = _progress_reporter(run_dir, flag, log)
        if weights.is_builtin(cfg.weights):
            pretrain.ensure_builtin(cfg.model, progress)
        exp = engine.prepare(cfg, runs_dir=run_dir.parent, progress=progress)
        if flag.requested:
            raise StopRequested
        store.write_progress(run_dir, message="training")
        status_callback = StatusCallback(run_dir)
        summary = engine.fit(
            exp,
            callbacks=[
                metrics,
                status_callback,
                StopCallback(flag),
                LogCallback(_Log(log.path, echo=False)),
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
    except StopTraining:  # raised outside the loop's own handler
        state, message = "stopped", "stopped; resume to continue from the last checkpoint"
        log.traceback()
    except Exception as error:  # noqa: BLE001 - every failure must end as a final state
        state, message = "failed", _failure_message(error)
        resumable = not isinstance(error, INPUT_FAILURES)
        log.traceback()
    finally:
        metrics.close()

    try:
        _finish_run(run_dir, exp, summary, state, message, resumable)
    finally:
        flag.restore()  # only now: a SIGTERM while the final state is written must not kill it
    return exit_code(state)


def _finish_run(
    run_dir: Path, exp, summary: dict[str, Any], state: str, message: str, resumable: bool
) -> None:
    """Writes summary.json, then the final status (readers that see it find the summary)."""
    summary = dict(summary)
    summary["state"] = state
    summary["message"] = message
    summary["skipped_files"] = list(getattr(getattr(exp, "data", None), "skipped_files", []) or [])
    if summary.get("best_val_acc") is None:
        val = store.read_metrics(run_dir).query("split == 'val'")["acc"].dropna()
        summary["best_val_acc"] = float(val.max()) if len(val) else None
    store.write_summary(run_dir, summary)
    store.set_state(
        run_dir,
        state,
        when=lambda s: s.get("pid") == os.getpid(),
        message=message,
        exit_code=exit_code(state),
        resumable=resumable,
    )
    if state == "completed":  # nothing resumes a completed run: keep what using it needs
        for name in RESUME_FILES:
            (run_dir / "checkpoints" / name).unlink(missing_ok=True)
    _Log(run_dir / "worker.log", echo=False)(
        message if message.startswith(state) else f"{state}: {message}"
    )


# What only resuming needs; a completed run keeps best.safetensors (what using it needs).
RESUME_FILES = ("last.safetensors", "last_state.pt")

# job kind -> the function that does it: (args, progress(fraction, message)) -> result
JOB_KINDS: dict[str, Callable] = {"estimate": estimate.run_job, "extract": uploads.extract_job}


def run_job(job_dir: str | os.PathLike) -> int:
    """Does a background job (see jobs.py) in this process; returns 0 when it completed,
    1 when it failed and 130 when it was cancelled (SIGTERM or Ctrl-C)."""
    job_dir = Path(job_dir).resolve()
    spec = jobs.claim(job_dir)
    flag = StopFlag()
    flag.install()

    def progress(fraction: float | None = None, message: str | None = None) -> None:
        if flag.requested:
            raise StopRequested
        if message is not None:
            jobs.update(job_dir, progress=fraction, message=message)

    try:
        result = JOB_KINDS[spec["kind"]](spec["args"], progress)
    except (StopRequested, KeyboardInterrupt):
        jobs.finish(job_dir, "cancelled", "cancelled")
        return exit_code("stopped")
    except Exception as error:  # noqa: BLE001 - a job always ends with a state
        traceback.print_exc()
        jobs.finish(job_dir, "failed", _failure_message(error).replace("worker.log", "job.log"))
        return exit_code("failed")
    finally:
        flag.restore()
    jobs.finish(job_dir, "completed", "done", result)
    return exit_code("completed")


def _completed_message(summary: dict[str, Any]) -> str:
    parts = []
    for key, label in (("best_val_acc", "best val acc"), ("test_acc", "test acc")):
        value = summary.get(key)
        if value is not None:
            parts.append(f"{label} {100 * value:.1f} %")
    if summary.get("train_time_s") is not None:
        parts.append(f"{summary['train_time_s']:.1f} s")
    return "completed" + (": " + ", ".join(parts) if parts else "")
