"""Background jobs that are not runs (the estimate first): a detached process reports its
progress in a folder, can be cancelled, and is found again by the same work."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from finetune_core import jobs
from finetune_core.config import RunConfig


def _args(**cfg) -> dict:
    base = dict(data="builtin:shapes", weights="none", image_size=32, batch_size=16)
    configs = {"full": RunConfig(**{**base, **cfg}).to_dict()}
    configs["linear_probe"] = RunConfig(**{**base, **cfg, "strategy": "linear_probe"}).to_dict()
    return {"configs": configs, "num_classes": 6}


def _wait(job, states, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = jobs.read(job)
        if status["state"] in states:
            return status
        time.sleep(0.2)
    raise AssertionError(
        f"the job did not get to {states}: {status}\n{(job / 'job.log').read_text()}"
    )


def test_an_estimate_job_runs_detached_and_the_same_work_finds_it_again(tmp_path):
    args = _args()
    job = jobs.start(tmp_path, "estimate", args)
    status = _wait(job, jobs.FINAL)
    assert status["state"] == "completed", status
    result = status["result"]
    assert set(result) == {"full", "linear_probe"}
    for m in result.values():
        assert 0 < m["step_s_min"] <= m["step_s"] <= m["step_s_max"]
        assert m["peak_bytes"] >= 0 and m["device"] == "cpu"
    assert result["linear_probe"]["trainable_params"] < result["full"]["trainable_params"]
    assert jobs.find(tmp_path, "estimate", args) == job  # a refreshed page finds it
    pid = status["pid"]
    assert jobs.start(tmp_path, "estimate", args) == job  # and does not measure again
    assert jobs.read(job)["pid"] == pid
    assert jobs.find(tmp_path, "estimate", _args(epochs=5)) is None  # other work: no job


def test_the_memory_of_a_config_measured_after_another_is_its_own(tmp_path):
    # all configs share the job's process: what the first freed must not hide the next's
    args = _args()
    alone = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_core.estimate",
            json.dumps(args["configs"]["linear_probe"]),
            "6",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    alone_bytes = json.loads(alone.stdout)["peak_bytes"]
    status = _wait(jobs.start(tmp_path, "estimate", args), jobs.FINAL)
    after_full = status["result"]["linear_probe"]["peak_bytes"]
    assert 0.5 * alone_bytes <= after_full <= 2 * alone_bytes, (after_full, alone_bytes)


def test_a_job_can_be_cancelled_while_it_works(tmp_path):
    job = jobs.start(tmp_path, "estimate", _args(image_size=224, batch_size=32))
    _wait(job, ("running",), timeout=60)
    deadline = time.time() + 60
    while "measuring" not in (jobs.read(job).get("message") or "") and time.time() < deadline:
        time.sleep(0.1)
    assert jobs.cancel(job)
    assert _wait(job, jobs.FINAL, timeout=60)["state"] == "cancelled"
    assert not jobs.cancel(job)  # nothing left to cancel


def test_a_job_whose_process_is_gone_reads_as_failed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    job = tmp_path / ".jobs" / "abc"
    job.mkdir(parents=True)
    (job / "job.json").write_text(json.dumps({"kind": "estimate", "args": {}}))
    jobs.update(job, state="running", pid=proc.pid, pid_started_at=1.0, progress=0.5)
    status = jobs.read(job)
    assert status["state"] == "failed" and "ended unexpectedly" in status["message"]
