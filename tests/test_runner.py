"""Workers and the queue live outside any page: a detached supervisor runs queued runs in order,
a killed worker is found crashed, queued runs can be cancelled and stopped runs resumed."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_runs import tiny_config, wait_for_status

from finetune_core import runner, store, worker
from finetune_core.config import ConfigError, RunConfig

TINY = tiny_config()


def _wait(run_dir: Path, predicate, timeout: float = 600, what: str = "the run") -> dict:
    return wait_for_status(run_dir, predicate, timeout, what)


LAUNCHER = """
import sys, time
from finetune_core import runner
from finetune_core.config import RunConfig
tiny = dict(data="builtin:shapes", model="resnet18", weights="none", image_size=32, epochs=1,
            batch_size=64, augment="none", strategy="linear_probe")
runs = runner.enqueue([RunConfig(**tiny, name="first"), RunConfig(**tiny, lr=0.05, name="second")],
                      sys.argv[1])
print("\\n".join(map(str, runs)), flush=True)
time.sleep(600)
"""


def test_queue_runs_queued_runs_one_after_the_other_after_the_launcher_is_killed(tmp_path):
    """Like a dashboard server killed mid-run: the supervisor and workers carry on alone."""
    root = tmp_path / "runs"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(Path(runner.__file__).parent.parent)},
    )
    runs = [Path(launcher.stdout.readline().strip()) for _ in range(2)]
    _wait(runs[0], lambda s: s["state"] == "running", what="the first run")
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and everything in its session
    launcher.wait()
    assert runner.supervisor_running(root)
    # a second supervisor for the same folder exits at once: the lock is taken
    started = time.time()
    assert runner.supervise(root, idle_exit_s=30) == 0
    assert time.time() - started < 5
    second = _wait(runs[1], lambda s: s["state"] not in store.LIVE_STATES, what="the second run")
    first = store.read_status(runs[0])
    assert [first["state"], second["state"]] == ["completed", "completed"], store.read_log_tail(
        runs[0]
    ) + store.read_log_tail(runs[1])
    assert first["finished_at"] <= second["started_at"]  # never both at once (max 1)
    assert first["pid"] != second["pid"]
    groups = {store.read_config(r)["group"] for r in runs}
    assert len(groups) == 1 and None not in groups
    for run_dir in runs:
        assert (run_dir / "summary.json").exists() and (run_dir / "worker.log").exists()
        assert not store.read_metrics(run_dir).empty


def test_a_killed_worker_is_marked_crashed_by_the_reader(tmp_path):
    run_dir = store.create_run(RunConfig(**{**TINY, "epochs": 3}), tmp_path / "runs")
    pid = runner.start_worker(run_dir)
    status = _wait(run_dir, lambda s: s.get("step", 0) >= 1, what="training")
    assert status["state"] == "running" and status["pid"] == pid
    os.kill(pid, signal.SIGKILL)
    status = _wait(run_dir, lambda s: s["state"] != "running", timeout=30)
    assert status["state"] == "crashed"
    assert "resume" in status["message"]
    assert store.list_runs(tmp_path / "runs").loc[0, "state"] == "crashed"


def test_cancel_takes_a_queued_run_out_of_the_queue(tmp_path):
    run_dir = store.create_run(RunConfig(**TINY), tmp_path / "runs")
    assert runner.stop_run(run_dir) == "cancelled"
    status = store.read_status(run_dir)
    assert status["state"] == "stopped"
    assert status["message"] == "cancelled before it started"
    assert store.read_summary(run_dir)["state"] == "stopped"
    assert runner.cancel_run(run_dir) is False  # no longer queued
    assert runner.stop_run(run_dir) == "not running"


def test_resume_requeues_a_stopped_run_and_refuses_a_completed_one(tmp_path):
    run_dir = store.create_run(RunConfig(**TINY), tmp_path / "runs")
    runner.cancel_run(run_dir)
    store.write_status(run_dir, stop_requested_at=time.time())
    runner.resume_run(run_dir, start=False)
    status = store.read_status(run_dir)
    assert status["state"] == "queued"
    assert status["resume"] is False  # no checkpoint: it starts over
    assert status["stop_requested_at"] is None  # the dashboard's Stop button works again
    store.write_status(run_dir, state="completed")
    with pytest.raises(store.RunError, match="only a stopped, crashed or failed"):
        runner.resume_run(run_dir, start=False)


def test_a_worker_refuses_a_run_that_is_not_queued(tmp_path):
    run_dir = store.create_run(RunConfig(**TINY), tmp_path / "runs")
    store.write_status(run_dir, state="completed")
    assert worker.run_worker(run_dir) == runner.EXIT_INVALID
    assert store.read_status(run_dir)["state"] == "completed"


def test_enqueue_validates_every_config_before_creating_any_run(tmp_path):
    with pytest.raises(ConfigError) as err:
        runner.enqueue([RunConfig(**TINY), RunConfig(**{**TINY, "epochs": 0})], tmp_path / "runs")
    assert "epochs" in err.value.errors
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_ensure_supervisor_starts_nothing_while_the_lock_is_held(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    fd = os.open(root / runner.SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert runner.supervisor_running(root)
        assert runner.ensure_supervisor(root) is False
    finally:
        os.close(fd)
    assert not runner.supervisor_running(root)


def test_supervisor_marks_orphans_crashed_and_exits_when_idle(tmp_path):
    root = tmp_path / "runs"
    run_dir = store.create_run(RunConfig(**TINY), root)
    store.write_status(run_dir, state="running", pid=2**22 + 12345, pid_started_at=1.0)
    started = time.time()
    assert runner.supervise(root, idle_exit_s=0.2, poll_s=0.05) == 0
    assert time.time() - started < 10
    assert store.read_status(run_dir)["state"] == "crashed"


def test_parallel_limit_comes_from_argument_then_environment_then_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("FINETUNE_MAX_PARALLEL", raising=False)
    assert runner.parallel_limit(tmp_path) == 1
    runner.set_max_parallel(tmp_path, 3)
    assert runner.parallel_limit(tmp_path) == 3
    monkeypatch.setenv("FINETUNE_MAX_PARALLEL", "2")
    assert runner.parallel_limit(tmp_path) == 2
    assert runner.parallel_limit(tmp_path, 4) == 4


def test_parallel_cpu_workers_share_the_cores_instead_of_each_taking_all(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert runner.worker_threads(1) == {}
    assert runner.worker_threads(2) == {"OMP_NUM_THREADS": "4"}
    assert runner.worker_threads(16) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert runner.worker_threads(2) == {}


def test_a_supervisor_that_exits_leaves_no_defunct_process_behind(tmp_path):
    root = tmp_path / "runs"
    assert runner.ensure_supervisor(root, idle_exit_s=0.3)
    proc = runner.BACKEND.children[-1]
    deadline = time.time() + 30
    while runner.supervisor_running(root) and time.time() < deadline:
        time.sleep(0.1)
    assert not runner.supervisor_running(root)
    time.sleep(1)  # the reaper's turn
    stat = Path(f"/proc/{proc.pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
