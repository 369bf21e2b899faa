"""Runs and their processes under stress (issue 9): a full disk (a real 20 MB tmpfs in a mount
namespace of its own), a worker that stops responding (SIGSTOP), a Stop that is ignored, a
broken status.json, a concurrent resume, CUDA running out of memory. Each ends with a final
state that says what happened, and the queue carries on with the other runs.

The full-disk tests need root and `unshare -m` (they are skipped without them): each runs
its whole scenario in one process inside a new mount namespace, writes what it saw as JSON
outside the small file system, and the test reads that.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_runs import tiny_config

from finetune_core import runner, store, worker
from finetune_core.callbacks import Callback
from finetune_core.config import RunConfig
from finetune_core.util.processes import process_alive, process_start_time

REPO = Path(__file__).resolve().parent.parent
TINY = tiny_config(strategy="linear_probe")


def _wait(predicate, timeout=120, what="it", every=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def _state(run_dir) -> str:
    return store.read_status(run_dir).get("state")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _end_supervisor(root: Path) -> None:
    """Sends SIGTERM to the runs folder's supervisor (its pid is in the lock file)."""
    try:
        pid = int((root / runner.SUPERVISOR_LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if runner.supervisor_running(root):
        os.kill(pid, signal.SIGTERM)
        _wait(lambda: not runner.supervisor_running(root), 30, "the supervisor's exit")


@pytest.fixture
def fast_escalation(monkeypatch):
    """Heartbeats twice a second, a stall after 4 s of silence, 1 s of grace after SIGTERM."""
    monkeypatch.setenv("FINETUNE_HEARTBEAT_S", "0.5")
    monkeypatch.setenv("FINETUNE_STALE_S", "4")
    monkeypatch.setenv("FINETUNE_STOP_GRACE_S", "1")


# ---------------------------------------------------------------------------------------------
# Readers never write; one broken status.json breaks nothing else


def test_readers_show_a_dead_or_silent_worker_without_writing_the_status(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    dead = store.create_run(RunConfig(**TINY, name="dead"), root, env={})
    store.write_status(dead, state="running", pid=_dead_pid(), pid_started_at=1.0)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        silent = store.create_run(RunConfig(**TINY, name="silent"), root, env={})
        store.write_status(
            silent,
            state="running",
            pid=sleeper.pid,
            pid_started_at=process_start_time(sleeper.pid),
            heartbeat_at=time.time() - 30,
        )
        monkeypatch.setenv("FINETUNE_STALE_S", "10")
        files = {d: (d / "status.json").read_bytes() for d in (dead, silent)}
        shown = store.read_status(dead)
        assert shown["state"] == "crashed" and shown["derived"] is True
        assert shown["message"] == store.CRASHED_MESSAGE
        stalled = store.read_status(silent)
        assert stalled["state"] == "stalled" and stalled["derived"] is True
        assert "no heartbeat for 30 s" in stalled["message"]
        listed = store.list_runs(root).set_index("name")["state"].to_dict()
        assert listed == {"dead": "crashed", "silent": "stalled"}
        store.compare_runs([dead, silent])
        with pytest.raises(store.RunError, match="stop it before deleting"):
            store.delete_run(silent)  # a stalled worker still runs
        assert {d: (d / "status.json").read_bytes() for d in (dead, silent)} == files
        monkeypatch.setenv("FINETUNE_STALE_S", "60")  # within the limit: running as recorded
        assert _state(silent) == "running"
    finally:
        sleeper.kill()
        sleeper.wait()


BROKEN_STATUSES = {
    "a string pid": '{"state": "running", "pid": "abc", "pid_started_at": 1.0}',
    "a list": '["running"]',
    "bad JSON": '{"state": "running", "pid": 12',
    "an unknown state": '{"state": "exploded"}',
    "a boolean step": '{"state": "queued", "step": true}',
    "bytes that are not UTF-8": b'{"state": "\xff\xfe"}',
}


@pytest.mark.parametrize("content", BROKEN_STATUSES.values(), ids=BROKEN_STATUSES.keys())
def test_a_broken_status_reads_as_unknown_with_a_message_and_changes_nothing(tmp_path, content):
    run_dir = store.create_run(RunConfig(**TINY), tmp_path / "runs", env={})
    path = run_dir / "status.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    before = path.read_bytes()
    status = store.read_status(run_dir)
    assert status["state"] == "unknown" and status["unreadable"] is True
    assert status["message"].startswith("status.json ")
    assert "repaired" in status["message"]
    assert store.list_runs(tmp_path / "runs").loc[0, "state"] == "unknown"
    assert store.any_queued(tmp_path / "runs") is False
    assert runner.stop_run(run_dir) == "not running"
    with pytest.raises(store.RunError, match="cannot be resumed"):
        runner.resume_run(run_dir, start=False)
    assert path.read_bytes() == before


def test_one_broken_status_does_not_stop_list_the_supervisor_or_home(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    for content in BROKEN_STATUSES.values():
        broken = store.create_run(RunConfig(**TINY), root, env={})
        path = broken / "status.json"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    good = store.create_run(RunConfig(**TINY, name="good"), root)
    listed = subprocess.run(
        [sys.executable, "-m", "finetune_core", "list", "--runs-dir", str(root)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("unknown") == len(BROKEN_STATUSES)
    assert "'pid' is 'abc', not a whole number" in listed.stderr
    assert "Traceback" not in listed.stderr
    # the supervisor trains the good run and leaves the broken ones alone
    assert runner.supervise(root, idle_exit_s=0.5, poll_s=0.1) == 0
    assert _state(good) == "completed", store.read_log_tail(good)
    table = store.list_runs(root).set_index("run_id")["state"]
    assert sorted(table) == ["completed", *["unknown"] * len(BROKEN_STATUSES)]

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FINETUNE_RUNS_DIR", str(root))
    home = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    assert not home.exception, [e.value for e in home.exception]
    training = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    training.switch_page("pages/2_Training.py")
    broken_id = next(r for r in table.index if table[r] == "unknown")
    training.query_params["run"] = broken_id
    training.run()
    assert not training.exception, [e.value for e in training.exception]
    assert any("This run is unknown" in w.value for w in training.warning)


# ---------------------------------------------------------------------------------------------
# Heartbeats, stalls and Stop


class _LongStep(Callback):
    """Sleeps `seconds` after step 2, as a very slow training step would (the GIL released)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.during = threading.Event()
        self.over = threading.Event()

    def on_batch_end(self, trainer) -> None:
        if trainer.step == 2:
            self.during.set()
            time.sleep(self.seconds)
            self.over.set()


def test_a_long_step_is_not_a_stall_the_heartbeat_beats_on(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_STALE_S", "3")  # beats every 0.6 s (a fifth of it)
    run_dir = store.create_run(RunConfig(**TINY), tmp_path / "runs")
    slow = _LongStep(seconds=6)
    seen: list[tuple[float, str]] = []

    def watch() -> None:
        slow.during.wait(120)
        while not slow.over.is_set():
            status = store.read_status(run_dir)
            seen.append((status.get("heartbeat_at"), status.get("state")))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert worker.run_worker(run_dir, callbacks=[slow]) == runner.EXIT_COMPLETED
    watcher.join(10)
    assert len(seen) > 10
    assert {state for _, state in seen} == {"running"}  # never "stalled" while it trains
    beats = sorted({beat for beat, _ in seen})
    assert len(beats) >= 4, beats  # the 6 s step saw beats go on
    final = store.read_status(run_dir)
    assert final["state"] == "completed" and isinstance(final["heartbeat_at"], float)


def test_a_sigstopped_worker_is_ended_and_the_run_queued_behind_it_starts(
    tmp_path, fast_escalation
):
    root = tmp_path / "runs"
    first, second = runner.enqueue(
        [RunConfig(**{**TINY, "epochs": 100}, name="stuck"), RunConfig(**TINY, name="next")],
        root,
    )
    status = _wait(
        lambda: (s := store.read_status(first)).get("step", 0) >= 1 and s.get("heartbeat_at") and s,
        what="the first run's first steps",
    )
    pid = status["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        _wait(lambda: _state(second) == "completed", 120, "the second run's completion")
        final = store.read_status(first)
        assert final["state"] == "crashed" and "derived" not in final  # recorded, not derived
        assert f"the worker (pid {pid}) stopped responding" in final["message"]
        assert "resume" in final["message"] and store.can_resume(final)
        assert not process_alive(pid, status["pid_started_at"])
        assert _state(second) == "completed"
    finally:
        if process_alive(pid, status["pid_started_at"]):
            os.kill(pid, signal.SIGKILL)
        _end_supervisor(root)


def test_stop_escalates_to_sigkill_when_the_worker_does_not_end(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_STALE_S", "600")  # only the Stop ends it here
    monkeypatch.setenv("FINETUNE_STOP_GRACE_S", "1")
    root = tmp_path / "runs"
    run_dir = store.create_run(RunConfig(**{**TINY, "epochs": 100}), root)
    pid = runner.start_worker(run_dir)  # no supervisor runs
    status = _wait(
        lambda: (s := store.read_status(run_dir)).get("step", 0) >= 1 and s, what="training"
    )
    assert not runner.supervisor_running(root)
    os.kill(pid, signal.SIGSTOP)
    try:
        stop = subprocess.run(
            [sys.executable, "-m", "finetune_core", "stop", run_dir.name, "--runs-dir", str(root)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert stop.returncode == 0, stop.stderr
        assert "kills it" in stop.stdout
        final = _wait(  # recorded by the supervisor, not only shown
            lambda: (
                (s := store.read_status(run_dir))["state"] in store.FINAL_STATES
                and not s.get("derived")
                and s
            ),
            60,
            "the recorded end of the stopped worker",
        )
        assert final["state"] == "stopped"
        assert f"the worker (pid {pid}) had not ended 1 s after Stop" in final["message"]
        assert "killed" in final["message"] and store.can_resume(final)
        assert not process_alive(pid, status["pid_started_at"])
    finally:
        if process_alive(pid, status["pid_started_at"]):
            os.kill(pid, signal.SIGKILL)
        _end_supervisor(root)


def test_a_concurrent_resume_is_refused_saying_already_running_with_the_pid(tmp_path):
    root = tmp_path / "runs"
    run_dir = store.create_run(RunConfig(**{**TINY, "epochs": 100}), root, env={})
    runner.cancel_run(run_dir)
    first = subprocess.Popen(
        [sys.executable, "-m", "finetune_core", "resume", run_dir.name, "--runs-dir", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        _wait(lambda: store.read_status(run_dir).get("pid") == first.pid, 60, "the first resume")
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "finetune_core",
                "resume",
                run_dir.name,
                "--runs-dir",
                str(root),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert second.returncode == runner.EXIT_INVALID
        assert f"already running (pid {first.pid})" in second.stderr
        with pytest.raises(store.RunError, match=rf"already running \(pid {first.pid}\)"):
            runner.resume_run(run_dir, start=False)
    finally:
        first.kill()
        first.wait()


# ---------------------------------------------------------------------------------------------
# Out of memory


def test_out_of_memory_fails_the_run_not_resumable_and_the_next_queued_run_completes(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(worker.OOM_HOOK_ENV, "3:too big")
    root = tmp_path / "runs"
    oom, after = runner.enqueue(
        [RunConfig(**{**TINY, "epochs": 2}, name="too big"), RunConfig(**TINY, name="after")],
        root,
    )
    try:
        _wait(lambda: _state(after) in store.FINAL_STATES, 180, "the second run's end")
        status = store.read_status(oom)
        assert status["state"] == "failed"
        assert "out of memory (CUDA out of memory" in status["message"]
        assert "reduce the batch size or image size" in status["message"]
        assert status["resumable"] is False and not store.can_resume(status)
        with pytest.raises(store.RunError, match="failed on its input"):
            runner.resume_run(oom, start=False)
        assert "OutOfMemoryError" in store.read_log_tail(oom, 80)
        assert store.read_summary(oom)["state"] == "failed"
        assert _state(after) == "completed", store.read_log_tail(after)
    finally:
        _end_supervisor(root)


# ---------------------------------------------------------------------------------------------
# A full disk: a real 20 MB file system in a mount namespace of its own


# Needs root and `unshare -m` (CI runs as root, like this machine): never skipped.

# Run inside the namespace: mounts the 20 MB tmpfs, then the scenario's code (SCENARIO).
NAMESPACE_PRELUDE = """
import contextlib, io, json, os, subprocess, sys, time, traceback
from pathlib import Path
disk, out = Path(sys.argv[1]), Path(sys.argv[2])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], check=True)
runs = disk / "runs"
from finetune_core import cli, runner, store
from finetune_core.config import RunConfig
TINY = dict(data="builtin:shapes", model="resnet18", weights="none", image_size=32,
            batch_size=64, augment="none", strategy="linear_probe")
seen = {"t": {}}
t0 = time.time()
mark = lambda what: seen["t"].__setitem__(what, round(time.time() - t0, 1))

def fill_disk():
    '''Fills the file system to its last byte, as another process on a shared server does.'''
    fd = os.open(disk / "fill", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for chunk in (1 << 20, 1 << 12, 1):
        try:
            while True:
                os.write(fd, b"0" * chunk)
        except OSError:
            pass
    os.close(fd)
    seen["free_after_fill"] = os.statvfs(disk).f_bavail

def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False

def first_epoch_done(run_dir):
    try:
        return '"split": "val"' in (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return False

def cli_says(*args):
    '''Runs the CLI in this process: (exit code, stdout, stderr) or the traceback.'''
    o, e = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            code = cli.main(list(args))
    except BaseException:
        return {"code": "raised", "traceback": traceback.format_exc()}
    return {"code": code, "out": o.getvalue(), "err": e.getvalue()}

try:
{scenario}
finally:
    (out / "seen.json").write_text(json.dumps(seen, indent=2, default=str))
"""


def _in_namespace(tmp_path: Path, scenario: str, timeout: float = 240) -> dict:
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    body = "\n".join("    " + line for line in scenario.strip("\n").splitlines())
    script = NAMESPACE_PRELUDE.replace("{scenario}", body)
    done = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", script, str(disk), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert not any(disk.iterdir())  # the small file system never showed outside
    return json.loads((out / "seen.json").read_text())


TRAINING_ON_A_FULL_DISK = """
# a run whose worker died without a final state, as a crash leaves it: readers must show it
dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()
orphan = store.create_run(RunConfig(**TINY, epochs=1, name="orphan"), runs, env={})
store.write_status(orphan, state="running", pid=dead.pid, pid_started_at=1.0)
victim = store.create_run(RunConfig(**TINY, epochs=300, name="victim"), runs, env={})
# the worker as the queue starts it, in the foreground here
train = subprocess.Popen([sys.executable, "-m", "finetune_core", "worker", str(victim)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
seen["started"] = wait_for(lambda: first_epoch_done(victim))
mark("epoch 1"); fill_disk()
out_text, err_text = train.communicate(timeout=120)
mark("train ended")
seen["train"] = {"code": train.returncode, "err": err_text[-3000:]}
run_dir = victim
seen["status"] = store.read_status(run_dir)
seen["summary_exists"] = (run_dir / "summary.json").exists()
seen["orphan"] = store.read_status(orphan)
seen["orphan_file_state"] = json.loads((orphan / "status.json").read_text())["state"]
seen["table"] = store.list_runs(runs).set_index("name")["state"].to_dict()
seen["list"] = cli_says("list", "--runs-dir", str(runs))
seen["show"] = cli_says("show", run_dir.name, "--runs-dir", str(runs))
seen["show_orphan"] = cli_says("show", orphan.name, "--runs-dir", str(runs))
mark("cli")
from streamlit.testing.v1 import AppTest
os.environ["FINETUNE_RUNS_DIR"] = str(runs)
app = str(Path.cwd() / "app.py")
home = AppTest.from_file(app, default_timeout=120).run()
seen["home_exceptions"] = [str(e.value) for e in home.exception]
mark("home")
for name, rd in (("training", run_dir), ("training_orphan", orphan)):
    page = AppTest.from_file(app, default_timeout=120)
    page.switch_page("pages/2_Training.py")
    page.query_params["run"] = rd.name
    page.run()
    seen[name + "_exceptions"] = [str(e.value) for e in page.exception]
    seen[name + "_texts"] = [str(e.value) for e in (*page.error, *page.warning)]
    mark(name)
"""


def test_a_full_disk_ends_the_run_failed_resumable_and_every_reader_still_works(tmp_path):
    seen = _in_namespace(tmp_path, TRAINING_ON_A_FULL_DISK)
    assert seen["started"] and seen["free_after_fill"] < 64  # blocks of 4 KiB
    disk = str(tmp_path / "disk")
    status = seen["status"]
    assert seen["train"]["code"] == runner.EXIT_FAILED, seen["train"]["err"]
    assert "Traceback" not in seen["train"]["err"]
    assert status["state"] == "failed" and status["resumable"] is True, status
    assert status["message"].startswith("the disk is full (No space left on device) while writing ")
    assert status["message"].endswith(f": free space on {disk} and resume the run")
    # the orphan is shown crashed by every reader, and nobody tried to write it
    assert seen["orphan"]["state"] == "crashed" and seen["orphan"]["derived"] is True
    assert seen["orphan_file_state"] == "running"
    assert seen["table"] == {"victim": "failed", "orphan": "crashed"}
    assert seen["list"]["code"] == 0, seen["list"]
    assert "failed" in seen["list"]["out"] and "crashed" in seen["list"]["out"]
    for shown in ("show", "show_orphan"):
        assert seen[shown]["code"] == 0, seen[shown]
    assert '"state": "failed"' in seen["show"]["out"]
    assert seen["home_exceptions"] == []
    assert seen["training_exceptions"] == [] and seen["training_orphan_exceptions"] == []
    assert any("the disk is full" in t for t in seen["training_texts"])
    assert any("ended without a final state" in t for t in seen["training_orphan_texts"])


SUPERVISOR_ON_A_FULL_DISK = """
first = store.create_run(RunConfig(**TINY, epochs=300, name="first"), runs, env={})
second = store.create_run(RunConfig(**TINY, epochs=1, name="second"), runs, env={})
log = open(out / "supervisor.log", "w")  # outside the full disk: what it says is kept
sup = subprocess.Popen(
    [sys.executable, "-m", "finetune_core", "queue", "--runs-dir", str(runs), "--idle-exit", "1",
     "--max-parallel", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
try:
    seen["started"] = wait_for(lambda: first_epoch_done(first))
    mark("epoch 1")
    fill_disk()
    seen["first_ended"] = wait_for(lambda: store.read_status(first)["state"] in store.FINAL_STATES)
    time.sleep(2)  # the supervisor tries the second run on the full disk
    seen["supervisor_alive_while_full"] = sup.poll() is None
    seen["second_while_full"] = store.read_status(second)["state"]
    os.unlink(disk / "fill")  # space is back
    mark("space back")
    seen["supervisor_code"] = sup.wait(timeout=120)
    mark("supervisor ended")
finally:
    if sup.poll() is None:
        sup.kill()
seen["first"] = store.read_status(first)
seen["second"] = store.read_status(second)
"""


def test_the_supervisor_outlives_a_full_disk_and_starts_the_next_run_once_space_is_back(tmp_path):
    seen = _in_namespace(tmp_path, SUPERVISOR_ON_A_FULL_DISK)
    log = (tmp_path / "out" / "supervisor.log").read_text()
    assert seen["started"] and seen["first_ended"], log
    first = seen["first"]
    assert first["state"] == "failed" and first["resumable"] is True
    assert first["message"].startswith("the disk is full (No space left on device) while writing")
    assert seen["supervisor_alive_while_full"], log
    assert seen["second_while_full"] == "queued"
    assert seen["second"]["state"] == "completed", log
    assert seen["supervisor_code"] == 0
    assert "Traceback" not in log
    assert "the disk is full" in log and "queued runs wait until there is space" in log


WORKER_WITHOUT_ROOM_FOR_ITS_FINAL_STATE = """
run_dir = store.create_run(RunConfig(**TINY, name="lost word"), runs, env={})

class Stand_in(runner.LocalProcesses):
    # a worker that ends as one does when not even its final state fits: exit code 75
    def start_worker(self, run_dir, parallel):
        return subprocess.Popen(["sh", "-c", "sleep 1; exit 75"])

runner.BACKEND = Stand_in()
import threading
def fill_once_running():
    wait_for(lambda: store.read_status(run_dir)["state"] == "running")
    fill_disk()
filler = threading.Thread(target=fill_once_running)
filler.start()
runner.supervise(runs, idle_exit_s=0.5, poll_s=0.1)
filler.join()
seen["status"] = store.read_status(run_dir)
"""


def test_the_supervisor_records_a_final_state_the_worker_had_no_room_for(tmp_path):
    seen = _in_namespace(tmp_path, WORKER_WITHOUT_ROOM_FOR_ITS_FINAL_STATE, timeout=120)
    assert seen["free_after_fill"] < 64
    status = seen["status"]
    assert status["state"] == "failed" and status["resumable"] is True, status
    assert status["exit_code"] == runner.EXIT_DISK_FULL
    assert status["message"] == (
        "the disk is full (No space left on device) while writing the run's final state: "
        f"free space on {tmp_path / 'disk'} and resume the run"
    )
