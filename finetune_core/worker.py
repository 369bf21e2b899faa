"""The worker: trains one run to a final state in this process (`python -m finetune_core
worker RUN_DIR`, started by the supervisor; the CLI's `train` and `resume` run it in the
foreground).

It claims the queued run, makes sure its weights can be had (pretraining the builtin ones
on first use), prepares data and model, and fits with callbacks that keep status.json,
metrics.jsonl and worker.log current, and a thread of its own writes a heartbeat into
status.json every few seconds (a long step is no stall; silence is, see store.status).
SIGTERM or Ctrl-C stops after the current step with a checkpoint. Whatever happens, the
run ends with summary.json and a final state: a full disk ends it failed (resumable) with
a message naming the file and the file system to free; when not even the final state
fits, the exit code 75 tells the supervisor, which records it. Out of memory ends it
failed with a message to reduce the batch or image size (not resumable: a resume would
run out of memory the same way), after freeing what the run held.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune_core import (
    checkpoints,
    data,
    distributed,
    drift,
    engine,
    estimate,
    jobs,
    lr_find,
    pretrain,
    store,
    tuning,
    uploads,
    weights,
)
from finetune_core.callbacks import Callback, StopTraining
from finetune_core.config import ConfigError, validate_fields
from finetune_core.device import DeviceError, pick_device
from finetune_core.runner import EXIT_DISK_FULL, EXIT_FAILED, EXIT_INVALID, exit_code
from finetune_core.util.durations import Eta
from finetune_core.util.files import disk_full_message, failed_write, note_failed_write

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
    """Appends timestamped lines to worker.log; echo also prints them to stderr (foreground).

    Best effort: on a full disk a line is lost, never the run's final state.
    """

    def __init__(self, path: Path | None, echo: bool):
        self.path = path  # None: stderr (a rank of a several-device run other than 0)
        self.echo = echo

    def append(self, text: str) -> None:
        if self.path is None:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(text)
            return
        with contextlib.suppress(OSError), open(self.path, "a") as f:
            f.write(text)

    def __call__(self, message: str) -> None:
        self.append(f"{datetime.now():%Y-%m-%d %H:%M:%S} {message}\n")
        if self.echo:
            with contextlib.suppress(OSError, ValueError):
                print(message, file=sys.stderr, flush=True)

    def traceback(self) -> None:
        self.append(traceback.format_exc())


class _MetricsWriter(store.MetricsWriter):
    """The metrics writer whose failed appends say which file they were writing."""

    def write(self, record: dict[str, Any]) -> None:
        try:
            super().write(record)
        except Exception as error:
            note_failed_write(error, self.path)
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a full disk refuses the buffer's last lines
            super().close()


class Heartbeat:
    """A daemon thread that writes heartbeat_at into status.json every interval_s while the
    run is this process's and running: proof of life that does not depend on the speed of
    a training step. A write the disk refuses is skipped (the run's own writes say why)."""

    def __init__(self, run_dir: Path, interval_s: float):
        self.run_dir = run_dir
        self.interval_s = interval_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _beat(self) -> None:
        me = os.getpid()
        while not self._done.wait(self.interval_s):
            with contextlib.suppress(Exception):
                store.write_progress(
                    self.run_dir,
                    when=lambda s: s.get("state") == "running" and s.get("pid") == me,
                    heartbeat_at=time.time(),
                )

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=30)


OOM_HOOK_ENV = "FINETUNE_TEST_RAISE_OOM_AT_STEP"


class _RaiseOutOfMemory(Callback):
    """Test hook ($FINETUNE_TEST_RAISE_OOM_AT_STEP = "STEP" or "STEP:RUN_NAME"): raises torch's
    OutOfMemoryError inside the training loop once that step is done, as CUDA would; with
    RUN_NAME only in the run of that name. CPUs cannot run out of GPU memory on cue."""

    def __init__(self, step: int):
        self.step = step

    @classmethod
    def from_env(cls, cfg) -> list[Callback]:
        value = os.environ.get(OOM_HOOK_ENV, "")
        step, _, name = value.partition(":")
        if not step.strip().isdigit() or (name and name != cfg.name):
            return []
        return [cls(int(step))]

    def on_batch_end(self, trainer) -> None:
        if trainer.step >= self.step:
            import torch

            error = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
            raise error(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (test hook {OOM_HOOK_ENV} at "
                f"step {self.step})"
            )


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

    def on_log(self, trainer, message) -> None:
        self.log(message)  # the engine's choices (the feature cache: used, or why not)


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


def _tuned(run_dir: Path, exp: engine.Experiment, progress: Callable, log: _Log):
    """Returns exp at its tuned lr: the search's result when the run already has one (a
    resume), else a new search (tuning.tune_lr), written into the run folder first."""
    found = store.read_tuning(run_dir)
    if found is None or "chosen_lr" not in found:
        log(f"tuning the learning rate (was {exp.cfg.lr:g}): range test, then trials on val")

        def report(fraction: float | None, message: str) -> None:
            progress("tuning", fraction, message)

        found = tuning.tune_lr(exp, progress=report).to_dict()
        trials = ", ".join(
            f"{t['lr']:g}: " + (f"{100 * t['val_acc']:.1f} %" if "val_acc" in t else "failed")
            for t in found["trials"]
        )
        log(f"tuned lr {found['chosen_lr']:g} (val accuracy per lr: {trials})")
        store.set_tuned_lr(run_dir, found)
    elif store.read_config(run_dir).get("lr") != found["chosen_lr"]:
        store.set_tuned_lr(run_dir, found)  # a crash between the two writes
    return dataclasses.replace(exp, cfg=dataclasses.replace(exp.cfg, lr=found["chosen_lr"]))


def _is_out_of_memory(error: BaseException) -> bool:
    return type(error).__name__ == "OutOfMemoryError"


def _failure_message(error: BaseException, run_dir: Path | None = None) -> str:
    if _is_out_of_memory(error):
        said = " ".join(str(error).split())
        first = ". ".join(said.split(". ")[:2])[:200]  # CUDA's advice after that is long
        return (
            f"out of memory ({first}): reduce the batch size or image size, or pick a smaller "
            "model, and launch it again (a resume would run out of memory the same way)"
        )
    full, path = failed_write(error)
    if full:
        what = path or "the run's files"
        if path and run_dir is not None and Path(path).is_relative_to(run_dir):
            what = str(Path(path).relative_to(run_dir))
        return disk_full_message(what, Path(path).parent if path else run_dir or Path.cwd())
    name = type(error).__name__
    if type(error).__module__.startswith("finetune_core"):
        return str(error) or name
    return f"{name}: {error} (the traceback is in worker.log)"


def _free_memory() -> None:
    """Gives back what a failed or finished run held (CUDA's cache included), so the next run
    on this GPU starts with it free; harmless without CUDA."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


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
        heartbeat_at=time.time(),
    )


def run_worker(run_dir: str | os.PathLike, *, callbacks: Iterable = (), echo: bool = False) -> int:
    """Trains a queued run (or one created for this process) to a final state; returns the
    exit code: 0 completed, 1 failed, 2 not runnable, 130 stopped, 75 the disk was too full
    to write the final state.

    Writes status.json (running, heartbeats, progress, final state), metrics.jsonl,
    checkpoints/, summary.json and worker.log. SIGTERM or Ctrl-C stops after the current
    step with a checkpoint. The CLI's `train` and `resume` call this in the foreground with
    echo=True and a progress-bar callback; the supervisor runs it as `python -m
    finetune_core worker`.
    """
    run_dir = Path(run_dir).resolve()
    if not store.is_run_dir(run_dir):
        print(f"error: {run_dir} is not a run folder (no config.json/status.json)", file=sys.stderr)
        return EXIT_INVALID
    log = _Log(run_dir / "worker.log", echo)
    try:
        status = _claim(run_dir)
    except OSError as error:  # a full disk before anything began: the run stays as it was
        full = failed_write(error)[0]
        with contextlib.suppress(OSError, ValueError):
            print(
                f"error: run {run_dir.name} was not started: {_failure_message(error, run_dir)}",
                file=sys.stderr,
            )
        return EXIT_DISK_FULL if full else EXIT_FAILED
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

    heartbeat = Heartbeat(run_dir, store.heartbeat_interval_s()).start()
    flag = StopFlag()
    flag.install()
    try:
        outcome = train_here(run_dir, flag, log, resume=resume, callbacks=callbacks, echo=echo)
        _free_memory()
        return _finish_run(run_dir, outcome, log)
    finally:
        heartbeat.stop()
        flag.restore()  # only now: a SIGTERM while the final state is written must not kill it


@dataclasses.dataclass
class Outcome:
    """How a training ended: the final state, its message, the summary, whether a resume
    is offered, and the data files skipped as unreadable."""

    state: str
    message: str
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    resumable: bool = True
    skipped: list[str] = dataclasses.field(default_factory=list)


def train_here(
    run_dir: Path,
    flag: StopFlag,
    log: _Log,
    *,
    resume: bool,
    callbacks: Iterable = (),
    echo: bool = False,
) -> Outcome:
    """Trains the run in this process (or, with devices > 1 and no process group yet, on
    several under torchrun: see train_on_devices); returns how it ended.

    Inside a several-device group every rank runs this; only rank 0 writes the run folder
    (metrics, status, checkpoints, log), the others train and stop with it."""
    writer = distributed.is_writer()
    metrics = _MetricsWriter(run_dir) if writer else None
    exp = None
    summary: dict[str, Any] = {}
    resumable = True
    try:
        cfg = store.run_config(run_dir)
        errors = validate_fields(cfg)
        if errors:
            raise ConfigError(errors)
        progress = _progress_reporter(run_dir, flag, log) if writer else _stop_check(flag)
        if weights.is_builtin(cfg.weights) and writer:
            pretrain.ensure_builtin(cfg.model, progress)
        if cfg.devices > 1 and not distributed.active():
            metrics.close()
            return train_on_devices(run_dir, cfg, flag, log, echo=echo)
        if not writer:
            distributed.barrier()  # rank 0 decodes the data first; the others read its cache
        exp = engine.prepare(cfg, runs_dir=run_dir.parent, progress=progress)
        if writer:
            distributed.barrier()
            for warning in getattr(exp.data, "warnings", ()):  # usable data worth a look
                log(f"warning: {warning}")
        if flag.requested:
            raise StopRequested
        if cfg.tune_lr:
            exp = _tuned(run_dir, exp, progress, log)
        status_callback = StatusCallback(run_dir)
        if writer:
            store.write_progress(run_dir, message="training")
            callbacks = [
                metrics,
                status_callback,
                StopCallback(flag),
                LogCallback(_Log(log.path, echo=False)),
                drift.DriftCallback(exp, metrics.write),  # θ₀: the model as prepared
                *_RaiseOutOfMemory.from_env(cfg),
                *callbacks,
            ]
        else:  # the stop is decided by all ranks together; nothing else to do here
            callbacks = [StopCallback(flag), ProgressOnly(status_callback)]
        summary = engine.fit(
            exp, callbacks=callbacks, checkpoint_dir=run_dir / "checkpoints", resume=resume
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
        log.traceback()
        if distributed.peer_lost(error):  # another rank died: not this run's own failure
            state, message = (
                "crashed",
                (
                    f"another training process of this run ended ({_failure_message(error)}); "
                    "resume to continue from the last checkpoint"
                ),
            )
        else:
            state, message = "failed", _failure_message(error, run_dir)
            # a full disk is the server's trouble (free space, resume); out of memory and bad
            # input are the run's own: a resume would fail the same way
            resumable = failed_write(error)[0] or not (
                isinstance(error, INPUT_FAILURES) or _is_out_of_memory(error)
            )
    finally:
        if metrics is not None:
            metrics.close()

    skipped = list(getattr(getattr(exp, "data", None), "skipped_files", []) or [])
    exp = None  # the model, its optimizer and data: freed before the next run needs them
    return Outcome(state, message, summary, resumable, skipped)


class ProgressOnly(Callback):
    """On a rank that writes nothing: keeps the epoch and step a stop message names."""

    def __init__(self, status: StatusCallback):
        self.status = status

    def on_batch_end(self, trainer) -> None:
        self.status.epoch, self.status.step = trainer.epoch, trainer.step


def _stop_check(flag: StopFlag) -> Callable:
    """Returns the progress function of a rank that writes nothing: it only stops on a signal."""

    def progress(stage: str, fraction: float | None, message: str) -> None:
        if flag.requested:
            raise StopRequested

    return progress


def _finish_run(run_dir: Path, outcome: Outcome, log: _Log) -> int:
    """Writes summary.json, then the final status (readers that see it find the summary);
    returns the exit code: that of the state, or EXIT_DISK_FULL when the final state could
    not be written (the supervisor records it then).

    A summary the disk refuses ends a completed or stopped run as failed (resumable), with
    the message saying which file to free space for.
    """
    summary, skipped = dict(outcome.summary), outcome.skipped
    state, message, resumable = outcome.state, outcome.message, outcome.resumable
    try:
        if summary.get("best_val_acc") is None:
            val = store.read_metrics(run_dir).query("split == 'val'")["acc"].dropna()
            summary["best_val_acc"] = float(val.max()) if len(val) else None
        store.write_summary(
            run_dir, {**summary, "state": state, "message": message, "skipped_files": skipped}
        )
    except OSError as error:
        log.traceback()
        if state != "failed":
            state, message, resumable = "failed", _failure_message(error, run_dir), True
    try:
        store.set_state(
            run_dir,
            state,
            when=lambda s: s.get("pid") == os.getpid(),
            message=message,
            exit_code=exit_code(state),
            resumable=resumable,
        )
    except OSError as error:
        log.traceback()
        log(f"{state}: {message}; the final state could not be written either ({error})")
        return EXIT_DISK_FULL if failed_write(error)[0] else EXIT_FAILED
    if state == "completed":  # nothing resumes a completed run: keep what using it needs
        with contextlib.suppress(OSError):
            checkpoints.drop_resume_state(run_dir / "checkpoints")
    _Log(run_dir / "worker.log", echo=False)(
        message if message.startswith(state) else f"{state}: {message}"
    )
    return exit_code(state)


# --- one run on several devices (torchrun) -------------------------------------------------

POLL_S = 0.2  # seconds between the worker's looks at its torchrun group


def train_on_devices(
    run_dir: Path, cfg, flag: StopFlag, log: _Log, *, echo: bool = False
) -> Outcome:
    """Trains the run on cfg.devices processes of this machine under torchrun (each runs
    `python -m finetune_core rank RUN_DIR`, i.e. run_rank); returns how it ended.

    This process stays the run's worker (its pid is in status.json, it beats the heartbeat
    and writes the final state): a stop (SIGTERM) is passed on to torchrun, which passes it
    to every rank; they stop after the same step and rank 0 saves the checkpoint. torchrun's
    output goes into worker.log. A rank that dies makes torchrun end the others, and the run
    ends crashed, with the rank and its signal or exit code in the message."""
    device = pick_device(cfg.device)
    if device.type == "cuda":
        import torch

        have = torch.cuda.device_count()
        if have < cfg.devices:
            raise DeviceError(
                f"--devices {cfg.devices} asks for {cfg.devices} GPUs, and this machine has "
                f"{have}: choose --devices {have} or fewer"
            )
    fd, outcome_path = tempfile.mkstemp(prefix=f"finetune-{run_dir.name}-", suffix=".json")
    os.close(fd)
    outcome_file = Path(outcome_path)
    outcome_file.unlink()  # rank 0 writes it at the end; none means it never got there
    command = distributed.launch_command(run_dir, cfg.devices)
    log(
        f"training on {cfg.devices} processes ({distributed.backend_for(device)}, "
        f"{device.type}): {' '.join(command[1:])}"
    )
    store.write_progress(run_dir, message=f"starting {cfg.devices} training processes")
    set_death_signal = distributed.death_signal_setter()
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=distributed.launch_env(cfg.devices, str(outcome_file), device.type),
        start_new_session=True,  # the terminal's Ctrl-C reaches the ranks through us only
        preexec_fn=set_death_signal,  # noqa: PLW1509 - only a prctl call, bound beforehand
    )
    output = _GroupOutput(proc, log).start()  # worker.log only: the terminal gets progress
    forwarded, said = False, ""
    try:
        while proc.poll() is None:
            if flag.requested and not forwarded:
                log(f"stop requested: SIGTERM to torchrun (pid {proc.pid}) and its ranks")
                proc.send_signal(signal.SIGTERM)
                forwarded = True
            if echo:  # in the foreground: rank 0's progress as status.json says it
                said = _echo_progress(run_dir, said)
            time.sleep(POLL_S)
    except BaseException:  # a second Ctrl-C: end the group at once
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()
        raise
    finally:
        output.join()
    code = proc.returncode
    reported = _read_outcome(outcome_file)
    first, cause = _root_cause(output.lines)
    if reported is not None and reported.state in ("completed", "stopped"):
        return reported
    if reported is not None and reported.state == "failed" and first in (None, 0):
        return reported  # rank 0's own failure (data, memory, a diverging loss, ...)
    if cause:
        lost = f"training process {cause}, so torchrun ended the others"
    else:
        lost = f"the training processes ended without a final state (torchrun: {_exit(code)})"
    return Outcome(
        "crashed",
        f"{lost}; resume to continue from the last checkpoint (worker.log has their output)",
        reported.summary if reported else {},
        True,
        reported.skipped if reported else [],
    )


def _echo_progress(run_dir: Path, said: str) -> str:
    """Prints status.json's message to stderr when it changed; returns the message."""
    status = store.read_status(run_dir)
    message = status.get("message") or ""
    if message and message != said:
        step, total = status.get("step"), status.get("total_steps")
        where = f"step {step}/{total}: " if step and total else ""
        with contextlib.suppress(OSError, ValueError):
            print(f"{where}{message}", file=sys.stderr, flush=True)
    return message


class _GroupOutput:
    """Copies torchrun's output (its own lines and every rank's) into worker.log; keeps the
    last lines for the crash message."""

    def __init__(self, proc: subprocess.Popen, log: _Log, keep: int = 200):
        self.proc, self.log = proc, log
        self.lines: list[str] = []
        self.keep = keep
        self._thread = threading.Thread(target=self._copy, name="torchrun-output", daemon=True)

    def start(self) -> _GroupOutput:
        self._thread.start()
        return self

    def _copy(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            self.log.append(line if line.endswith("\n") else line + "\n")
            self.lines = (self.lines + [line.rstrip("\n")])[-self.keep :]

    def join(self) -> None:
        self._thread.join(timeout=30)


def _root_cause(lines: list[str]) -> tuple[int | None, str]:
    """Returns the first failed rank of torchrun's failure report and what happened to it
    in words: (1, "rank 1 (pid 123) was killed by signal 9 (SIGKILL)"); (None, "") when
    the output holds no report."""
    text = "\n".join(lines)
    at = text.rfind("Root Cause")
    if at < 0:
        return None, ""
    block = text[at:]
    rank = re.search(r"rank\s*:\s*(\d+)", block)
    code = re.search(r"exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)", block)
    if not rank or not code:
        return None, ""
    return int(
        rank.group(1)
    ), f"rank {rank.group(1)} (pid {code.group(2)}) {_exit(int(code.group(1)))}"


def _exit(code: int | None) -> str:
    """Returns a process's exit status in words: "exited with code 1", "was killed by
    signal 9 (SIGKILL)"."""
    if code is None or code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown"
    return f"was killed by signal {-code} ({name})"


def _read_outcome(path: Path) -> Outcome | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return Outcome(**data)


def run_rank(run_dir: str | os.PathLike) -> int:
    """Trains one rank of a several-device run (started by train_on_devices under torchrun:
    `python -m finetune_core rank RUN_DIR`); returns the exit code of the outcome. Rank 0
    writes the run folder and the outcome for the worker, the others only train."""
    distributed.die_with_parent()  # torchrun gone (killed with its worker): so is this rank
    run_dir = Path(run_dir).resolve()
    flag = StopFlag()
    flag.install()
    try:
        cfg = store.run_config(run_dir)
        distributed.init(pick_device(cfg.device))
        writer = distributed.is_writer()
        log = _Log(run_dir / "worker.log" if writer else None, echo=False)
        if writer:
            log(
                f"rank 0 of {distributed.world_size()} (pid {os.getpid()}) trains run "
                f"{run_dir.name}; only it writes the run folder"
            )
        status = store.read_status(run_dir)
        resume = bool(status.get("resume")) and (run_dir / "checkpoints" / "last_state.pt").exists()
        outcome = train_here(run_dir, flag, log, resume=resume)
        if writer:
            _write_outcome(outcome)
        return exit_code(outcome.state)
    finally:
        distributed.shutdown()
        flag.restore()


def _write_outcome(outcome: Outcome) -> None:
    path = os.environ.get(distributed.OUTCOME_ENV)
    if not path:
        return
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(outcome), default=str))
    os.replace(tmp, path)


# job kind -> the function that does it: (args, progress(fraction, message)) -> result
JOB_KINDS: dict[str, Callable] = {
    "estimate": estimate.run_job,
    "extract": uploads.extract_job,
    "lr_find": lr_find.run_job,
}


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
