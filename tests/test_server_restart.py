"""Runs live outside the dashboard: SIGKILL the Streamlit server mid-run, the worker keeps
training and appending metrics, and a new server shows the run live and can stop it."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from dashboard_fixtures import (
    CHROMIUM,
    CHROMIUM_ARGS,
    free_port,
    kill_server,
    plot_points,
    start_server,
)
from playwright.sync_api import sync_playwright

from finetune_core import runner, store
from finetune_core.config import RunConfig
from finetune_core.util.processes import process_alive


def _metric_lines(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except OSError:
        return 0


def _parent(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rfind(")") + 2 :].split()[1])


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_run_survives_a_server_kill_and_a_new_server_shows_and_stops_it(tmp_path):
    runs = tmp_path / "runs"
    env = dict(os.environ)
    env.update(
        FINETUNE_RUNS_DIR=str(runs),
        TORCH_HOME=str(tmp_path / "torch"),
        FINETUNE_REFRESH_S="1",
        OMP_WAIT_POLICY="PASSIVE",  # see test_e2e_browser: 2 shared cores
    )
    cfg = RunConfig(
        weights="none", image_size=32, batch_size=16, epochs=30, augment="none", name="survivor"
    )
    run_dir = store.create_run(cfg, runs)  # queued; no supervisor runs yet
    port = free_port()
    first = start_server(env, port, tmp_path / "server1.log")
    try:
        with sync_playwright() as p:  # a page view makes the server start the supervisor
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            browser.new_page().goto(f"http://127.0.0.1:{port}/")
            _wait(lambda: runner.supervisor_running(runs), 60, "the server to start a supervisor")
            browser.close()
        supervisor = int((runs / runner.SUPERVISOR_LOCK).read_text())
        assert _parent(supervisor) == first.pid  # started by the server, in its own session
        _wait(lambda: _metric_lines(run_dir) >= 1, 180, "the first metrics record")
        status = store.read_status(run_dir)
        assert status["state"] == "running"
        worker_pid = status["pid"]

        kill_server(first)  # SIGKILL: no chance to clean up anything
        assert process_alive(worker_pid, status["pid_started_at"])
        assert runner.supervisor_running(runs)
        lines = _metric_lines(run_dir)
        _wait(lambda: _metric_lines(run_dir) > lines, 120, "metrics after the server died")
        assert store.read_status(run_dir)["state"] == "running"

        port = free_port()
        second = start_server(env, port, tmp_path / "server2.log")
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/Training?run={run_dir.name}")
                page.wait_for_selector(".js-plotly-plot", timeout=60_000)
                page.locator("h3").filter(has_text=re.compile(r"\brunning$")).wait_for(
                    timeout=30_000
                )
                before = plot_points(page, "Loss")
                _wait(lambda: plot_points(page, "Loss") > before, 120, "the chart to move")
                page.get_by_role("button", name=re.compile("Stop")).click()
                _wait(lambda: store.read_status(run_dir)["state"] == "stopped", 120, "stopped")
                page.locator("h3").filter(has_text=re.compile(r"\bstopped$")).wait_for(
                    timeout=30_000
                )
                assert page.get_by_role("button", name=re.compile("Resume")).is_visible()
                browser.close()
        finally:
            kill_server(second)
        _wait(
            lambda: not process_alive(worker_pid, status["pid_started_at"]),
            30,
            "the worker to exit",
        )
        assert store.read_summary(run_dir)["state"] == "stopped"
        assert (run_dir / "checkpoints" / "last_state.pt").exists()
    finally:
        kill_server(first)
        if store.read_status(run_dir)["state"] in store.LIVE_STATES:
            runner.stop_run(run_dir)
        lock = runs / runner.SUPERVISOR_LOCK
        if runner.supervisor_running(runs) and lock.read_text().strip():
            os.kill(int(lock.read_text().strip()), 15)
