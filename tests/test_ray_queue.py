"""The queue on a Ray cluster (FINETUNE_RUNNER=ray): runs go through a real local Ray head that
this module starts on loopback, and come back with the run folder's usual contract; a stop
ends as stopped and resumes; a job lost without its final state is recorded crashed. The
status mapping, the resources and the messages are pinned without Ray too."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_runs import tiny_config, wait_for_status

from finetune_core import ray_jobs, runner, store
from finetune_core.config import RunConfig
from finetune_core.store import status as status_module
from finetune_core.util.processes import process_alive

TINY = tiny_config(device="cpu")  # the test's head has no GPU: a run asks for none
PACKAGE_ROOT = str(Path(runner.__file__).resolve().parent.parent)


# ---------------------------------------------------------------------------------------------
# Without Ray: what a job's end, resources and environment map onto


def test_a_job_that_ends_without_the_workers_final_state_is_crashed_stopped_or_failed():
    lost = ray_jobs.job_end(
        "j1", "FAILED", "Job supervisor actor died\nmore", -9, worker_started=True, stop_asked=False
    )
    assert lost["state"] == "crashed"
    assert "Ray job j1 FAILED: Job supervisor actor died, exit code -9" in lost["message"]
    assert lost["message"].startswith(store.CRASHED_MESSAGE)
    from_outside = ray_jobs.job_end(
        "j2",
        "STOPPED",
        "Job was intentionally stopped.",
        None,
        worker_started=True,
        stop_asked=False,
    )
    assert from_outside["state"] == "crashed"  # `ray job stop` from outside: no final state
    asked = ray_jobs.job_end("j3", "STOPPED", None, None, worker_started=True, stop_asked=True)
    assert asked["state"] == "stopped" and "resume" in asked["message"]
    never_started = ray_jobs.job_end(
        "j4",
        "FAILED",
        "Job entrypoint command failed with exit code 1, last available logs:\nNo module",
        1,
        worker_started=False,
        stop_asked=False,
    )
    assert never_started["state"] == "failed" and never_started["resumable"] is True
    assert "before its worker started" in never_started["message"]
    assert "worker.log" in never_started["message"]


def test_a_job_asks_for_the_runs_gpus_and_the_configured_cpus():
    env = {"FINETUNE_RAY_NUM_CPUS": "4"}
    assert ray_jobs.job_resources({"device": "cpu"}, env) == {
        "entrypoint_num_gpus": 0,
        "entrypoint_num_cpus": 4.0,
    }
    assert ray_jobs.job_resources({"device": "auto"}, {})["entrypoint_num_gpus"] == 1
    assert ray_jobs.job_resources({"device": "cuda", "devices": 2}, {}) == {
        "entrypoint_num_gpus": 2,
        "entrypoint_num_cpus": 2.0,  # one per device's process
    }
    assert (
        ray_jobs.job_resources({"device": "cuda", "devices": "x"}, {"FINETUNE_RAY_NUM_CPUS": "-1"})[
            "entrypoint_num_cpus"
        ]
        == 1.0
    )


def test_a_jobs_environment_carries_the_projects_settings_and_the_queues_stop_grace():
    environ = {
        "FINETUNE_DATA_DIR": "/shared/data",
        "TORCH_HOME": "/shared/torch",
        "HOME": "/root",
        "PYTHONPATH": "/extra",
    }
    env = ray_jobs.job_env(environ, "/code", num_cpus=2, grace_s=60)
    assert env["FINETUNE_DATA_DIR"] == "/shared/data" and env["TORCH_HOME"] == "/shared/torch"
    assert "HOME" not in env  # the node's own
    assert env["PYTHONPATH"] == os.pathsep.join(["/code", "/extra"])
    assert env["OMP_NUM_THREADS"] == "2" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == "60"  # Ray's SIGKILL waits as long as the queue


def _ray_status(**fields):
    now = time.time()
    return {
        "state": "running",
        "pid": 2**22 + 7,  # no process here
        "pid_started_at": 1.0,
        "heartbeat_at": now,
        "backend": "ray",
        "job_id": "finetune-x",
        "host": "node-b",
        **fields,
    }


def test_a_pid_on_another_host_reads_by_its_heartbeat_never_as_crashed_here():
    assert store.shown_status(_ray_status())["state"] == "running"
    silent = store.shown_status(_ray_status(heartbeat_at=time.time() - 10_000))
    assert silent["state"] == store.STALLED and silent["derived"] is True
    assert "on node-b (job finetune-x)" in silent["message"]
    pending = store.shown_status(_ray_status(pid=None, pid_started_at=None, host=None))
    assert pending["state"] == "running"  # the supervisor follows a job not started yet
    here = store.shown_status(_ray_status(host=status_module.this_host()))
    assert here["state"] == "crashed" and here["derived"] is True  # a pid of this machine
    local = store.shown_status({k: v for k, v in _ray_status().items() if k not in ("backend",)})
    assert local["state"] == "crashed"


def test_job_fields_leave_with_the_job_and_a_local_run_never_gets_them(tmp_path):
    run_dir = store.create_run(RunConfig(**TINY), tmp_path / "runs")
    store.set_state(run_dir, "running", pid=os.getpid())
    assert not {"backend", "job_id", "host"} & set(store.read_status(run_dir))  # local: as before
    store.set_state(run_dir, "stopped", message="x")
    store.set_state(run_dir, "queued")
    job = {"pid": None, "pid_started_at": None, "backend": "ray", "job_id": "j", "host": None}
    store.set_state(run_dir, "running", pid=lambda: dict(job, message="submitted"))
    status = store.read_status(run_dir)
    assert (status["job_id"], status["pid"], status["message"]) == ("j", None, "submitted")
    assert status_module.claim_for_job(run_dir, "another job") is None
    claimed = status_module.claim_for_job(run_dir, "j")
    assert claimed["pid"] == os.getpid() and claimed["host"] == status_module.this_host()
    store.set_state(run_dir, "running", pid=os.getpid())  # the worker's own claim keeps them
    assert store.read_status(run_dir)["job_id"] == "j"
    store.set_state(run_dir, "stopped", message="x")
    store.set_state(run_dir, "running", pid=os.getppid())  # a foreground resume: local now
    status = store.read_status(run_dir)
    assert (status["backend"], status["job_id"], status["host"]) == (None, None, None)


def test_a_stop_asked_before_the_jobs_worker_started_keeps_it_from_starting(tmp_path):
    run_dir = store.create_run(RunConfig(**TINY), tmp_path / "runs")
    job = {"pid": None, "pid_started_at": None, "backend": "ray", "job_id": "j", "host": None}
    store.set_state(run_dir, "running", pid=lambda: job)
    store.request_stop(run_dir, None, None, "j")
    assert store.stop_requested_at(run_dir, store.read_status(run_dir)) is not None
    assert status_module.claim_for_job(run_dir, "j") is None
    assert ray_jobs.main([str(run_dir), "j"]) == ray_jobs.EXIT_STOPPED
    store.set_state(run_dir, "stopped", message="x")
    store.set_state(run_dir, "queued")  # resumed: a stop of the old job does not carry over
    job2 = dict(job, job_id="j2")
    store.set_state(run_dir, "running", pid=lambda: job2)
    assert store.stop_requested_at(run_dir, store.read_status(run_dir)) is None


def test_the_local_runner_is_the_default_and_never_imports_ray():
    probe = (
        "import sys\n"
        "from finetune_core import runner\n"
        "print(type(runner.BACKEND).__name__, 'ray' in sys.modules,"
        " 'finetune_core.ray_jobs' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FINETUNE_RUNNER"}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE_ROOT,
        env={**env, "PYTHONPATH": PACKAGE_ROOT},
    ).stdout.split()
    assert out == ["LocalProcesses", "False", "False"]
    assert isinstance(runner.backend_from_env({"FINETUNE_RUNNER": "ray"}), ray_jobs.RayJobs)
    odd = runner.backend_from_env({"FINETUNE_RUNNER": "slurm"})
    with pytest.raises(store.RunError, match="FINETUNE_RUNNER is 'slurm'.*local, ray"):
        odd.start_worker(Path("/nonexistent"), 1)


def test_without_ray_installed_the_runner_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.job_submission", None)  # import fails as if absent
    jobs = runner.backend_from_env({"FINETUNE_RUNNER": "ray"})
    with pytest.raises(ray_jobs.ClusterUnavailable, match="pip install -r requirements-ray.txt"):
        jobs.client()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_cluster_is_named_by_its_ray_address_and_the_run_waits(tmp_path):
    address = f"http://127.0.0.1:{_free_port()}"
    jobs = runner.backend_from_env({"FINETUNE_RUNNER": "ray", "RAY_ADDRESS": address})
    with pytest.raises(ray_jobs.ClusterUnavailable, match=f"RAY_ADDRESS={address}") as refused:
        jobs.client()
    message = jobs.waiting_message(refused.value)
    assert message.startswith("waiting for the Ray cluster") and "ray start --head" in message


class _FakeCluster:
    """Stands in for the Jobs API (the real one is below): a job whose status the test sets."""

    name = "ray"

    def __init__(self):
        self.info = SimpleNamespace(status="RUNNING", message=None, driver_exit_code=None)
        self.stopped: list[str] = []

    def adopt(self, job_id, run_dir):
        return ray_jobs.RayJob(self, job_id, run_dir)

    def job_info(self, job_id):
        return self.info

    def stop_job(self, job_id):
        self.stopped.append(job_id)
        return True

    def append_log(self, job_id, run_dir):
        with open(run_dir / "worker.log", "a") as log:
            log.write(f"--- the Ray log of job {job_id} ---\n")

    def waiting_message(self, error):
        return None


def _running_as_job(tmp_path, job_id="j", **fields):
    run_dir = store.create_run(RunConfig(**TINY), tmp_path / "runs")
    job = {"pid": None, "pid_started_at": None, "backend": "ray", "job_id": job_id, "host": None}
    store.set_state(run_dir, "running", pid=lambda: job)
    if fields:
        store.write_status(run_dir, **fields)
    return run_dir


def _poll_until_recorded(queue, run_dir, cluster_status, cluster):
    cluster.info = SimpleNamespace(status=cluster_status, message=None, driver_exit_code=None)
    cluster.info.message = {"FAILED": "Job supervisor actor died"}.get(cluster_status)
    for job in queue.workers.values():
        job.asked_at = 0.0  # ask the cluster at the next poll
    queue.poll()
    return store.read_status(run_dir)


def test_a_restarted_supervisor_follows_a_runs_job_and_records_it_lost_with_its_node(
    tmp_path, monkeypatch
):
    cluster = _FakeCluster()
    monkeypatch.setattr(runner, "BACKEND", cluster)
    run_dir = _running_as_job(tmp_path, pid=2**22 + 7, host="node-b", heartbeat_at=time.time())
    queue = runner._Queue(tmp_path / "runs", None)  # no memory of the job: it adopts it
    assert queue.poll() is True and run_dir in queue.workers
    assert store.read_status(run_dir)["state"] == "running"  # the job runs: nothing recorded
    status = _poll_until_recorded(queue, run_dir, "FAILED", cluster)
    assert status["state"] == "crashed" and not status.get("derived")
    assert "Ray job j FAILED: Job supervisor actor died" in status["message"]
    assert "the Ray log of job j" in (run_dir / "worker.log").read_text()
    assert store.can_resume(status) and run_dir not in queue.workers


def test_a_stop_of_a_job_goes_to_the_cluster_and_a_job_it_ended_is_recorded_stopped(
    tmp_path, monkeypatch
):
    cluster = _FakeCluster()
    monkeypatch.setattr(runner, "BACKEND", cluster)
    monkeypatch.setattr(runner, "ensure_supervisor", lambda *a, **k: False)
    run_dir = _running_as_job(tmp_path)  # pending: its worker has not started
    with pytest.raises(store.RunError, match=r"already running \(Ray job j\)"):
        runner.resume_run(run_dir, start=False)
    assert runner.stop_run(run_dir) == "stopping"
    assert cluster.stopped == ["j"]
    assert store.stop_requested_at(run_dir, store.read_status(run_dir)) is not None
    queue = runner._Queue(tmp_path / "runs", None)
    queue.poll()
    status = _poll_until_recorded(queue, run_dir, "STOPPED", cluster)
    assert status["state"] == "stopped" and "resume" in status["message"]


def test_a_job_that_failed_before_its_worker_started_fails_with_rays_word(tmp_path, monkeypatch):
    cluster = _FakeCluster()
    monkeypatch.setattr(runner, "BACKEND", cluster)
    run_dir = _running_as_job(tmp_path)
    queue = runner._Queue(tmp_path / "runs", None)
    queue.poll()
    status = _poll_until_recorded(queue, run_dir, "FAILED", cluster)
    assert status["state"] == "failed" and store.can_resume(status)
    assert "before its worker started" in status["message"]


# ---------------------------------------------------------------------------------------------
# A real Ray head on loopback


def _descendants(roots: set[int]) -> set[int]:
    children: dict[int, set[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                text = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(text[text.rfind(")") + 2 :].split()[1])
                children.setdefault(ppid, set()).add(int(entry))
    found, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _processes_of(temp_dir: str, gcs_port: int) -> set[int]:
    """Returns the head's processes and their children: those whose command line names its
    temp dir, or its GCS port as the address they serve (Ray's client server)."""
    roots = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                args = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
                serves = any(
                    a.startswith("--address=") and a.endswith(f":{gcs_port}")
                    for a in args.split("\0")
                )
                if temp_dir in args or serves:
                    roots.add(int(entry))
    return _descendants(roots)


def _end(pids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of this module's own on 127.0.0.1 (dashboard and Jobs API included), with a
    temporary folder and a small object store; ended with every process it started."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    gcs, dashboard, client, agent = (_free_port() for _ in range(4))
    ray = str(Path(sys.executable).with_name("ray"))
    started = subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--dashboard-host",
            "127.0.0.1",
            "--include-dashboard",
            "true",
            "--temp-dir",
            temp_dir,
            "--object-store-memory",
            str(100 * 1024 * 1024),
            "--num-cpus",
            "2",
            "--num-gpus",
            "0",
            "--port",
            str(gcs),
            "--dashboard-port",
            str(dashboard),
            "--ray-client-server-port",
            str(client),
            "--dashboard-agent-listen-port",
            str(agent),
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        from ray.job_submission import JobSubmissionClient

        client, deadline = None, time.time() + 60
        while client is None:  # the Jobs API may answer a little after `ray start` returns
            try:
                client = JobSubmissionClient(address)
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield address, client
    finally:
        _end(_processes_of(temp_dir, gcs))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_supervisor(root: Path) -> None:
    """Ends the supervisor of a runs folder (its pid is in the lock file), as Ctrl-C would."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((root / runner.SUPERVISOR_LOCK).read_text().split()[0]), signal.SIGTERM)
    deadline = time.time() + 30
    while runner.supervisor_running(root) and time.time() < deadline:
        time.sleep(0.2)


@pytest.fixture
def on_ray(ray_head, monkeypatch, tmp_path):
    """This test's supervisors run the queue on the module's Ray head; ended after it."""
    address, client = ray_head
    monkeypatch.setenv("FINETUNE_RUNNER", "ray")
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setenv("FINETUNE_RAY_NUM_CPUS", "2")
    monkeypatch.setenv("FINETUNE_STOP_GRACE_S", "30")
    yield client
    _stop_supervisor(tmp_path / "runs")


def _wait(run_dir: Path, predicate, timeout: float = 300, what: str = "the run") -> dict:
    return wait_for_status(run_dir, predicate, timeout, what)


def _job_status(client, job_id: str, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while True:
        status = str(client.get_job_status(job_id))
        if status in ray_jobs.TERMINAL or time.time() > deadline:
            return status
        time.sleep(0.5)


def test_a_run_queued_on_ray_completes_as_a_job_with_the_usual_run_folder(on_ray, tmp_path):
    client = on_ray
    [run_dir] = runner.enqueue([RunConfig(**TINY)], tmp_path / "runs")
    status = _wait(run_dir, lambda s: s["state"] not in store.LIVE_STATES)
    assert status["state"] == "completed", store.read_log_tail(run_dir, 40)
    assert status["backend"] == "ray" and status["job_id"].startswith(f"finetune-{run_dir.name}")
    assert status["host"] == status_module.this_host() and isinstance(status["pid"], int)
    assert _job_status(client, status["job_id"]) == "SUCCEEDED"
    metrics = store.read_metrics(run_dir)
    assert {"train", "val"} <= set(metrics["split"]) and metrics["step"].max() == 18
    assert (run_dir / "checkpoints" / "best.safetensors").exists()
    summary = store.read_summary(run_dir)
    assert summary["state"] == "completed" and summary["best_val_acc"] is not None
    log = (run_dir / "worker.log").read_text()
    assert f"worker pid {status['pid']} starts run {run_dir.name}" in log  # written directly
    info = client.get_job_info(status["job_id"])  # on a GPU-less head: it asked for none
    assert info.metadata["finetune_run"] == run_dir.name
    assert info.runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "30"


def test_a_stop_goes_through_the_jobs_api_saves_a_checkpoint_and_the_run_resumes(on_ray, tmp_path):
    client = on_ray
    [run_dir] = runner.enqueue([RunConfig(**{**TINY, "epochs": 2})], tmp_path / "runs")
    _wait(run_dir, lambda s: s.get("step", 0) >= 2, what="training")
    job_id = store.read_status(run_dir)["job_id"]
    assert runner.stop_run(run_dir) == "stopping"
    status = _wait(run_dir, lambda s: s["state"] not in store.ACTIVE_STATES, timeout=120)
    assert status["state"] == "stopped", status
    assert status["message"].startswith("stopped at epoch")  # the worker's own word: SIGTERM
    assert status["exit_code"] == runner.EXIT_STOPPED
    assert _job_status(client, job_id) == "STOPPED"
    assert (run_dir / "checkpoints" / "last_state.pt").exists()
    stopped_step = status["step"]

    runner.resume_run(run_dir)
    status = _wait(run_dir, lambda s: s["state"] not in store.LIVE_STATES, what="the resumed run")
    assert status["state"] == "completed", store.read_log_tail(run_dir, 40)
    assert status["job_id"] != job_id  # a new job
    log = (run_dir / "worker.log").read_text()
    assert f"starts run {run_dir.name} (resume)" in log
    assert f"from step {stopped_step}" in log
    metrics = store.read_metrics(run_dir)
    assert metrics["step"].max() == 36


def test_a_job_lost_with_its_worker_on_another_host_is_recorded_crashed_and_resumes(
    on_ray, tmp_path
):
    [run_dir] = runner.enqueue([RunConfig(**{**TINY, "epochs": 3})], tmp_path / "runs")
    # into the second epoch: the first one's checkpoint is there to resume from
    status = _wait(run_dir, lambda s: s.get("step", 0) > 18, what="the second epoch")
    # as if the worker ran on another node: its pid means nothing to the readers here
    store.write_status(run_dir, host="node-b")
    os.kill(status["pid"], signal.SIGKILL)  # it dies without a word, as with its node
    while process_alive(status["pid"]):
        time.sleep(0.05)
    seen = store.read_status(run_dir)  # never taken for dead here: its pid is another host's
    assert not seen.get("derived"), seen
    assert seen["state"] in ("running", "crashed"), seen  # crashed: the supervisor was quick
    status = _wait(run_dir, lambda s: s["state"] == "crashed" and not s.get("derived"), timeout=60)
    assert f"Ray job {status['job_id']} FAILED" in status["message"], status["message"]
    assert status["message"].startswith(store.CRASHED_MESSAGE)
    assert "the Ray log of job" in (run_dir / "worker.log").read_text()
    _stop_supervisor(run_dir.parent)  # the resumed run stays queued
    runner.resume_run(run_dir, start=False)
    queued = store.read_status(run_dir)
    assert queued["state"] == "queued" and queued["resume"] is True
    assert (queued["backend"], queued["job_id"], queued["host"]) == (None, None, None)


TRAP = """
import signal, sys, time
from pathlib import Path

def stop(*_):
    time.sleep(5)  # saving a checkpoint: longer than Ray's own 3 s before SIGKILL
    Path(sys.argv[1]).write_text("saved")
    sys.exit(130)

signal.signal(signal.SIGTERM, stop)
Path(sys.argv[1] + ".started").write_text("")
while True:
    time.sleep(0.1)
"""


def test_rays_stop_job_sends_sigterm_and_waits_the_grace_each_job_is_given(ray_head, tmp_path):
    """What the Ray backend relies on, in the installed Ray: stop_job sends SIGTERM to the
    entrypoint's processes and SIGKILLs only after the job's RAY_JOB_STOP_WAIT_TIME_S."""
    _address, client = ray_head
    script, marker = tmp_path / "trap.py", tmp_path / "saved"
    script.write_text(TRAP)
    env = ray_jobs.job_env({}, PACKAGE_ROOT, num_cpus=1, grace_s=20)
    job = client.submit_job(
        entrypoint=f"{sys.executable} {script} {marker}",
        runtime_env={"env_vars": env},
        entrypoint_num_cpus=1,
    )
    deadline = time.time() + 60
    while not Path(f"{marker}.started").exists():
        assert time.time() < deadline, client.get_job_logs(job)
        time.sleep(0.2)
    assert client.stop_job(job) is True
    assert _job_status(client, job) == "STOPPED"
    assert marker.read_text() == "saved"  # not SIGKILLed at Ray's default 3 s
