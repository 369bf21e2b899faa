"""The queue on a Ray cluster (FINETUNE_RUNNER=ray): each run's worker is a Ray job.

The supervisor stays one local process per runs folder (runner.py). With this backend it
submits each queued run through Ray's Jobs API (`ray.job_submission.JobSubmissionClient`;
the cluster in RAY_ADDRESS as Ray reads it, the head's dashboard: http://HEAD:8265) as the
job `python -m finetune_core.ray_jobs RUN_DIR JOB_ID`. On the node Ray picks, that process
marks the run as its own (its pid and host, store.claim_for_job), sends its output to the
run's worker.log and becomes `python -m finetune_core worker RUN_DIR` (exec: the same
process, so the worker finds the run its own). Every node must see the runs folder and the
data at the same paths, and have the same Python environment (FINETUNE_RAY_PYTHON, else
the supervisor's interpreter).

Each job asks for the run's resources: entrypoint_num_gpus the run's `devices` (1), none
for a run on cpu or mps; entrypoint_num_cpus FINETUNE_RAY_NUM_CPUS (one per device), which
is also the worker's OMP_NUM_THREADS. Stop is the Jobs API's stop_job: Ray sends SIGTERM to
the job's processes (the worker saves a checkpoint and ends as stopped) and SIGKILL after
RAY_JOB_STOP_WAIT_TIME_S, which each job gets set to the queue's grace period
(FINETUNE_STOP_GRACE_S, 60 s) instead of Ray's 3 s.

The supervisor follows each job through the Jobs API: a job that ends while its run still
says running (its node lost, a `ray job stop` from outside, a killed worker) is recorded
crashed, or stopped when Stop asked for it; one that failed before its worker started (a
node that cannot import finetune_core or see the runs folder) failed, with Ray's message;
either way the job's own Ray log is appended to worker.log. Readers on other hosts go by
the heartbeat (store.status).

Ray itself is imported only when a job is submitted, stopped or followed: importing this
module does not load it, and the local mode never imports this module.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finetune_core import store
from finetune_core.store.status import claim_for_job, this_host

NAME = "ray"  # status.json's "backend"
RAY_MISSING = (
    "FINETUNE_RUNNER=ray needs Ray's Jobs API (ray[default]), which is not installed for "
    "{python}: pip install -r requirements-ray.txt"
)
RETRY_S = 5.0  # seconds between attempts to reach a cluster that did not answer
POLL_EVERY_S = 2.0  # seconds between two questions about one job
PENDING_NOTE_S = 30.0  # a job pending this long says what it waits for in status.json
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_INVALID = 2  # as the worker's (runner.EXIT_INVALID): nothing to start
EXIT_STOPPED = 130  # as runner.EXIT_STOPPED


class ClusterUnavailable(store.RunError):
    """Ray is not installed, or its cluster does not answer; the message says what to do."""


def _env_number(environ: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(environ.get(name) or default)
    except ValueError:
        return default
    return value if value > 0 and math.isfinite(value) else default


def job_resources(config: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> dict:
    """Returns the Jobs API's resource arguments for a run's config.json: as many GPUs as the
    run's `devices` (1 when it has none), none on cpu or mps; FINETUNE_RAY_NUM_CPUS CPUs, by
    default one per device (each of a multi-device run's processes has one)."""
    devices = config.get("devices", 1)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        devices = 1
    device = str(config.get("device") or "auto")
    gpus = 0 if device.startswith(("cpu", "mps")) else devices
    return {
        "entrypoint_num_gpus": gpus,
        "entrypoint_num_cpus": _env_number(environ, "FINETUNE_RAY_NUM_CPUS", float(devices)),
    }


def job_env(
    environ: Mapping[str, str], package_root: str, num_cpus: float, grace_s: float
) -> dict[str, str]:
    """Returns the environment variables a run's job gets (Ray's runtime_env env_vars): this
    project's settings (FINETUNE_*, TORCH_HOME), finetune_core importable, unbuffered
    output, OpenMP waiting passively with one thread per CPU the job holds, and Ray's stop
    grace set to the queue's."""
    env = {k: v for k, v in environ.items() if k.startswith("FINETUNE_") or k in ("TORCH_HOME",)}
    paths = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([package_root, *paths]))
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_WAIT_POLICY"] = environ.get("OMP_WAIT_POLICY", "PASSIVE")
    env["OMP_NUM_THREADS"] = environ.get("OMP_NUM_THREADS") or str(max(1, int(num_cpus)))
    # Ray's stop_job: SIGTERM, then SIGKILL after this many seconds (its default is 3 s, too
    # short for a checkpoint); read by the job's supervisor actor, which gets these variables
    env["RAY_JOB_STOP_WAIT_TIME_S"] = str(max(1, math.ceil(grace_s)))
    return env


def _first_line(text: str | None, limit: int = 300) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def job_end(
    job_id: str,
    job_status: str,
    job_message: str | None,
    exit_code: int | None,
    *,
    worker_started: bool,
    stop_asked: bool,
) -> dict[str, Any]:
    """Returns the final state to record for a run whose Ray job ended (job_status) while
    status.json still said running: stopped when Stop asked for it, failed when the job
    failed before its worker started, else crashed (resumable from the last checkpoint)."""
    said = _first_line(job_message)
    how = f"{job_status}: {said}" if said else job_status
    code = f", exit code {exit_code}" if exit_code is not None else ""
    if stop_asked:
        return {
            "state": "stopped",
            "message": f"stopped: Ray job {job_id} ended ({how}) before its worker wrote its "
            "final state; resume to continue from the last checkpoint",
            "exit_code": exit_code,
        }
    if not worker_started and job_status == "FAILED":
        return {
            "state": "failed",
            "message": f"Ray job {job_id} failed before its worker started ({how}{code}); its "
            "log is at the end of worker.log. Every node needs the runs folder at the same "
            "path and finetune_core's Python environment (FINETUNE_RAY_PYTHON); resume once "
            "that is fixed",
            "resumable": True,
            "exit_code": exit_code,
        }
    return {
        "state": "crashed",
        "message": f"{store.CRASHED_MESSAGE} (Ray job {job_id} {how}{code})",
        "exit_code": exit_code,
    }


def _wants(resources: Mapping[str, Any]) -> str:
    gpus = resources.get("entrypoint_num_gpus", 0)
    cpus = resources.get("entrypoint_num_cpus", 1)
    return f"{gpus:g} GPU{'s' if gpus != 1 else ''} and {cpus:g} CPU{'s' if cpus != 1 else ''}"


def submitted_message(job_id: str, resources: Mapping[str, Any]) -> str:
    """Returns what a run whose job was just submitted says in status.json."""
    return f"submitted to the Ray cluster as job {job_id}; it starts on a node with {_wants(resources)} free"


def pending_message(job_id: str, resources: Mapping[str, Any], waited_s: float) -> str:
    """Returns what a run whose job waits long for a node says in status.json."""
    hint = (
        "; a run on a CPU-only cluster needs --device cpu"
        if resources.get("entrypoint_num_gpus")
        else ""
    )
    return (
        f"waiting in the Ray cluster for a node with {_wants(resources)} free: job {job_id}, "
        f"pending for {waited_s:.0f} s{hint}"
    )


class RayJob:
    """A run's worker as a Ray job: what the queue's supervisor follows (runner._Queue)."""

    pid = None  # the worker's pid lives in status.json, on the job's host

    def __init__(self, jobs: RayJobs, job_id: str, run_dir: Path, resources: Mapping | None = None):
        self.jobs, self.job_id, self.run_dir = jobs, job_id, run_dir
        self.resources = dict(resources or {})
        self.since = time.time()
        self.info: Any = None  # the Jobs API's JobDetails, once it answered
        self.asked_at = 0.0
        self.noted_pending = False

    def poll(self) -> int | None:
        """Returns the job's exit code once it ended (-1 when Ray gives none, as for a
        stopped job), else None; asks the cluster at most every POLL_EVERY_S. A run whose
        worker wrote its final state (or that another owner took) needs no question: its
        job is done with it, whether or not the cluster still answers."""
        status = store.read_status(self.run_dir)
        if (
            status.get("recorded_state", status.get("state")) != "running"
            or status.get("job_id") != self.job_id
        ):
            code = status.get("exit_code")
            return code if isinstance(code, int) else 0
        now = time.monotonic()
        if self.info is None or now - self.asked_at >= POLL_EVERY_S:
            self.asked_at = now
            info = self.jobs.job_info(self.job_id)
            if info is not None:
                self.info = info
        status = self.status()
        if status == "PENDING" and not self.noted_pending:
            self._note_pending()
        if status not in TERMINAL:
            return None
        code = getattr(self.info, "driver_exit_code", None)
        return code if isinstance(code, int) else -1

    def status(self) -> str | None:
        """Returns the job's last known status (PENDING, RUNNING, SUCCEEDED, ...)."""
        if self.info is None:
            return None
        return str(getattr(self.info, "status", "")) or None

    def _note_pending(self) -> None:
        waited = time.time() - self.since
        if waited < PENDING_NOTE_S:
            return
        self.noted_pending = True
        message = pending_message(self.job_id, self.resources, waited)
        with contextlib.suppress(OSError, store.RunError):
            store.write_progress(
                self.run_dir,
                when=lambda s: s.get("job_id") == self.job_id and s.get("pid") is None,
                message=message,
            )

    def kill(self) -> None:
        """Stops the job (SIGTERM, then Ray's SIGKILL)."""
        with contextlib.suppress(store.RunError):
            self.jobs.stop_job(self.job_id)

    def end_without_final_state(self, run_dir: Path) -> dict[str, Any]:
        """Returns the final state of the run this ended job left running, and appends the
        job's Ray log to worker.log."""
        status = store.read_status(run_dir)
        code = getattr(self.info, "driver_exit_code", None)
        end = job_end(
            self.job_id,
            self.status() or "FAILED",
            getattr(self.info, "message", None),
            code if isinstance(code, int) else None,
            worker_started=status.get("pid") is not None,
            stop_asked=store.stop_requested_at(run_dir, status) is not None,
        )
        self.jobs.append_log(self.job_id, run_dir)
        return end


class RayJobs:
    """The backend that runs each worker as a Ray job. The supervisor and the background jobs
    (estimates, extractions) stay local processes: `local` starts them."""

    name = NAME

    def __init__(
        self,
        local: Any,
        *,
        package_root: str,
        grace_s: Callable[[], float],
        environ: Mapping[str, str] = os.environ,
    ):
        self.local = local
        self.package_root = package_root
        self.grace_s = grace_s
        self.environ = environ
        self._client: Any = None
        self._refused: tuple[float, ClusterUnavailable] | None = None
        self.said: set[str] = set()

    # what stays local
    @property
    def children(self) -> list:
        return self.local.children

    def spawn(self, *args: Any, **kwargs: Any) -> Any:
        return self.local.spawn(*args, **kwargs)

    def stop(self, pid: int, started_at: float | None = None) -> bool:
        """SIGTERM to a local worker (a foreground `train` or `resume`, which no job runs)."""
        return self.local.stop(pid, started_at)

    def kill(self, pid: int, started_at: float | None = None) -> bool:
        return self.local.kill(pid, started_at)

    # the cluster
    def address(self) -> str:
        return self.environ.get("RAY_ADDRESS") or "(unset: Ray looks for a cluster on this machine)"

    def client(self) -> Any:
        """Returns the Jobs API client (connecting on first use); ClusterUnavailable when Ray
        is not installed or the cluster does not answer (tried again after RETRY_S)."""
        if self._client is not None:
            return self._client
        if self._refused is not None and time.monotonic() - self._refused[0] < RETRY_S:
            raise self._refused[1]
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError as e:
            raise ClusterUnavailable(RAY_MISSING.format(python=sys.executable)) from e
        try:
            # RAY_ADDRESS as Ray reads it (unset: a cluster started on this machine)
            self._client = JobSubmissionClient(self.environ.get("RAY_ADDRESS") or None)
        except Exception as e:  # noqa: BLE001 - Ray raises several kinds for "no cluster"
            refusal = ClusterUnavailable(
                f"cannot reach the Ray cluster's Jobs API at RAY_ADDRESS={self.address()} "
                f"({type(e).__name__}: {_first_line(str(e))}); start the cluster (ray start "
                "--head --dashboard-host 0.0.0.0) or set RAY_ADDRESS to its dashboard, "
                "http://HEAD:8265"
            )
            self._refused = (time.monotonic(), refusal)
            raise refusal from e
        self._refused = None
        return self._client

    def waiting_message(self, error: BaseException) -> str | None:
        """Returns what a queued run says while the cluster refuses to start it."""
        if isinstance(error, ClusterUnavailable):
            return f"waiting for the Ray cluster: {error}"
        return None

    def start_worker(self, run_dir: Path, parallel: int) -> RayJob:
        """Submits the run's worker as a Ray job with the run's resources; returns the job.
        (`parallel` is the supervisor's limit; the cluster places jobs by resources.)"""
        run_dir = Path(run_dir).resolve()
        resources = job_resources(store.read_config(run_dir), self.environ)
        job_id = f"finetune-{run_dir.name}-{secrets.token_hex(3)}"
        python = self.environ.get("FINETUNE_RAY_PYTHON") or sys.executable
        entrypoint = " ".join(
            [
                shlex.quote(python),
                "-m",
                "finetune_core.ray_jobs",
                shlex.quote(str(run_dir)),
                job_id,
            ]
        )
        env = job_env(
            self.environ, self.package_root, resources["entrypoint_num_cpus"], self.grace_s()
        )
        client = self.client()
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env={"env_vars": env},
                metadata={"finetune_run": run_dir.name, "runs_dir": str(run_dir.parent)},
                **resources,
            )
        except Exception as e:  # noqa: BLE001 - the cluster refused or went away
            self._client = None
            raise ClusterUnavailable(
                f"the Ray cluster at RAY_ADDRESS={self.address()} did not take the job "
                f"({type(e).__name__}: {_first_line(str(e))})"
            ) from e
        return RayJob(self, job_id, run_dir, resources)

    def owner(self, job: RayJob) -> dict[str, Any]:
        """Returns the status.json fields that name the job as the run's owner."""
        return {
            "pid": None,
            "pid_started_at": None,
            "backend": NAME,
            "job_id": job.job_id,
            "host": None,
            "message": submitted_message(job.job_id, job.resources),
        }

    def adopt(self, job_id: str, run_dir: Path) -> RayJob:
        """Returns the job of a run that an earlier supervisor submitted."""
        return RayJob(self, job_id, Path(run_dir))

    def job_info(self, job_id: str) -> Any:
        """Returns the job's JobDetails; None when the cluster does not answer now (said once
        in the supervisor's log), a FAILED stand-in when it no longer knows the job."""
        try:
            return self.client().get_job_info(job_id)
        except ClusterUnavailable as e:
            self._say_once(str(e))
            return None
        except RuntimeError as e:  # the Jobs API answered with an error
            if "404" in str(e) or "does not exist" in str(e):
                return _Lost(f"the Ray cluster no longer knows job {job_id} (its head restarted?)")
            self._say_once(f"cannot follow Ray job {job_id}: {_first_line(str(e))}")
            return None
        except Exception as e:  # noqa: BLE001 - a lost connection: ask again next time
            self._client = None
            self._say_once(f"cannot follow Ray job {job_id}: {type(e).__name__}: {e}")
            return None

    def stop_job(self, job_id: str) -> bool:
        """Asks Ray to stop the job (SIGTERM, then SIGKILL after the grace); returns whether
        it was still running. ClusterUnavailable when the cluster cannot be reached."""
        try:
            return bool(self.client().stop_job(job_id))
        except ClusterUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - Ray's errors for a gone job or cluster
            if "404" in str(e) or "does not exist" in str(e):
                return False
            raise ClusterUnavailable(
                f"cannot stop Ray job {job_id} through RAY_ADDRESS={self.address()}: "
                f"{type(e).__name__}: {_first_line(str(e))}"
            ) from e

    def append_log(self, job_id: str, run_dir: Path) -> None:
        """Appends the job's Ray log (what ran before the worker's own output went to
        worker.log, and Ray's own lines) to worker.log; nothing when it cannot be had."""
        try:
            text = self.client().get_job_logs(job_id)
        except Exception:  # noqa: BLE001 - the log lived on a lost node, or no cluster
            return
        if not text:
            return
        with contextlib.suppress(OSError), open(run_dir / "worker.log", "a") as log:
            log.write(f"--- the Ray log of job {job_id} ---\n{text.rstrip()}\n---\n")

    def _say_once(self, text: str) -> None:
        if text not in self.said:
            self.said.add(text)
            with contextlib.suppress(OSError, ValueError):
                print(text, flush=True)


class _Lost:
    """The details of a job the cluster forgot: it ended, without an exit code."""

    status = "FAILED"
    driver_exit_code = None

    def __init__(self, message: str):
        self.message = message


def main(argv: list[str] | None = None) -> int:
    """The job's entrypoint: claims the run for this process and becomes its worker (exec);
    returns 2 when the run is not this job's, 130 when a stop came first."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m finetune_core.ray_jobs RUN_DIR JOB_ID", file=sys.stderr)
        return EXIT_INVALID
    run_dir, job_id = Path(args[0]).resolve(), args[1]
    if not store.is_run_dir(run_dir):
        print(
            f"error: {run_dir} is not a run folder on {this_host()}: every node must see the "
            "runs folder at the same path",
            file=sys.stderr,
        )
        return EXIT_INVALID
    claimed = claim_for_job(run_dir, job_id)
    if claimed is None:
        status = store.read_status(run_dir)
        if status.get("job_id") == job_id and status.get("stop_requested_at") is not None:
            print(f"run {run_dir.name} was stopped before its worker started", file=sys.stderr)
            return EXIT_STOPPED
        print(f"error: run {run_dir.name} is no longer job {job_id}'s: {status.get('state')}")
        return EXIT_INVALID
    print(f"worker pid {os.getpid()} on {this_host()}: output in {run_dir / 'worker.log'}")
    sys.stdout.flush()
    log = os.open(run_dir / "worker.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.chdir(run_dir)
    python = sys.executable
    os.execv(python, [python, "-m", "finetune_core", "worker", str(run_dir)])
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
