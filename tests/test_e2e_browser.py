"""The dashboard in a real browser: Debian's Chromium driven by Playwright against
`streamlit run app.py` on 127.0.0.1. A new user's path: New run -> launch a comparison
group -> watch it train live (no reload needed; a reload loses nothing) -> Compare.

Needs /usr/bin/chromium (`apt-get install chromium`; never `playwright install`).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from dashboard_fixtures import (
    CHROMIUM,
    CHROMIUM_ARGS,
    free_port,
    kill_server,
    plot_points,
    plot_titles,
    start_server,
    wait_idle,
)
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from finetune_core import runner, store


@pytest.fixture
def server(tmp_path):
    runs = tmp_path / "runs"
    env = dict(os.environ)
    env.update(
        FINETUNE_RUNS_DIR=str(runs),
        TORCH_HOME=str(tmp_path / "torch"),
        FINETUNE_REFRESH_S="1",  # progress every 1 s, charts (tested below to move) every 2 s
        FINETUNE_CHART_REFRESH_S="2",
        # browser, server and worker share 2 cores: OpenMP threads that spin while waiting
        # for a core can make a training step 30x slower
        OMP_WAIT_POLICY="PASSIVE",
        # the data folder is the session's (conftest), so built-in data is generated once
        FINETUNE_DATA_DIR=os.environ.get("FINETUNE_DATA_DIR", str(tmp_path / "data")),
    )
    port = free_port()
    proc = start_server(env, port, tmp_path / "server.log")
    yield f"http://127.0.0.1:{port}", runs
    kill_server(proc)
    for run in store.list_runs(runs).itertuples():  # never leave a worker behind
        if run.state in store.LIVE_STATES:
            runner.stop_run(Path(run.path))
    lock = runs / runner.SUPERVISOR_LOCK
    if runner.supervisor_running(runs) and lock.read_text().strip():
        os.kill(int(lock.read_text().strip()), 15)


def choose(page, label: str, option: str) -> None:
    box = page.locator('[data-testid="stSelectbox"]').filter(has_text=label)
    box.scroll_into_view_if_needed()
    item = page.get_by_role("option", name=option, exact=True)
    for _ in range(5):  # a click that lands during a rerun may not open the list
        box.get_by_role("button", name="Open").click()
        try:
            item.wait_for(timeout=3000)
            break
        except PlaywrightTimeout:
            wait_idle(page)
    item.click()
    wait_idle(page)
    assert page.get_by_role("combobox", name=label).input_value() == option


def set_number(page, label: str, value) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    wait_idle(page)


def test_new_user_launches_a_comparison_watches_it_live_and_reads_the_answer(server, tmp_path):
    url, runs = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            user_journey(page, url, runs)
        except BaseException:
            page.screenshot(path=tmp_path / "failure.png")
            for run in store.list_runs(runs).itertuples():
                print(run.run_id, store.read_status(Path(run.path)))
                print(store.read_log_tail(Path(run.path), 10))
            raise
        finally:
            browser.close()


def user_journey(page, url: str, runs: Path) -> None:
    # New run: the defaults compare full, last_n 1 and linear_probe; make them tiny.
    page.goto(f"{url}/New_run")
    wait_idle(page, timeout=120)
    page.get_by_text("None (random init)").click()
    wait_idle(page)
    set_number(page, "Epochs", 2)
    set_number(page, "Image size (px)", 32)
    set_number(page, "Batch size", 16)
    choose(page, "Augmentation", "none")  # linear_probe then caches the backbone's features
    launch = page.get_by_role("button", name="Launch")
    assert launch.is_enabled()
    launch.click()

    # Training: the first run of the group, charts that move without a reload.
    page.wait_for_url(re.compile(r".*/Training\?run=\d{8}-\d{6}-[0-9a-f]{6}"), timeout=30_000)
    run_id = page.url.rsplit("=", 1)[1]
    group = store.read_config(runs / run_id)["group"]
    assert group and len(store.list_runs(runs)) == 3
    page.evaluate("() => { window.__same_page = true; }")
    seen = []
    deadline = time.time() + 120
    while len(set(seen)) < 3 and time.time() < deadline:
        n = plot_points(page, "Loss")
        if n > 0 and (not seen or n > seen[-1]):
            seen.append(n)
        time.sleep(0.3)
    assert len(set(seen)) >= 3, f"the loss chart did not gain points twice: {seen}"
    assert page.evaluate("() => window.__same_page === true"), "the page was reloaded"

    # A reload mid-run loses nothing: the same run, still live, still gaining points.
    # (150 steps, a record every 10: the run is still going after three records)
    assert store.read_status(runs / run_id)["state"] == "running"
    page.reload()
    page.wait_for_selector(".js-plotly-plot", timeout=60_000)
    assert f"run={run_id}" in page.url
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 4")
    before = plot_points(page, "Loss")
    assert before >= seen[-1], "the reloaded page lost points"
    deadline = time.time() + 60
    while plot_points(page, "Loss") <= before and time.time() < deadline:
        time.sleep(0.3)
    assert plot_points(page, "Loss") > before, "no new points after the reload"

    # Compare: follow the link, wait for the group to finish, read the answer.
    page.get_by_text("Compare this group").click()
    page.wait_for_url(re.compile(rf".*/Compare\?group={group}"), timeout=30_000)
    deadline = time.time() + 240
    headline = ""
    while time.time() < deadline:
        done = all(s in store.FINAL_STATES for s in store.list_runs(runs)["state"])
        heads = page.locator("h3").all_inner_texts()
        headline = next((h for h in heads if "is best with" in h), "")
        still = page.get_by_text("still training").count()
        if done and headline and not still:
            break
        time.sleep(1)
    assert set(store.list_runs(runs)["state"]) == {"completed"}
    assert re.search(r"is best with \d+\.\d % val accuracy", headline), headline
    assert any(s in headline for s in ("full", "last_n 1", "linear_probe"))
    # The page's last rerun (live -> final) may still be drawing the charts below the fold:
    # read them once they have settled, then assert.
    wanted = (
        "Accuracy vs trainable parameters",
        "Accuracy vs train time",
        "Val accuracy (%) by",
        "Val loss by",
        "Per-class accuracy",
        "Confusion matrices",
    )
    wait_idle(page)
    deadline = time.time() + 30
    while True:
        titles = plot_titles(page)
        points = plot_points(page, "Val accuracy (%) by")
        drawn = all(sum(t.startswith(w) for t in titles) == 1 for w in wanted)
        if (drawn and points == 3 * 2) or time.time() > deadline:
            break
        time.sleep(0.5)
    for expected in wanted:
        assert sum(t.startswith(expected) for t in titles) == 1, (expected, titles)
    assert points == 3 * 2, points  # three runs, two epochs


def test_home_rename_reads_back_in_the_picker_and_no_page_asks_another_host(server):
    from dashboard_fixtures import write_run

    url, runs = server
    runs.mkdir(parents=True, exist_ok=True)
    write_run(runs, "20250101-000000-aaaaaa", name="before")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        elsewhere = []
        page.on(
            "request",
            lambda r: elsewhere.append(r.url) if not r.url.startswith(url) else None,
        )
        drawn = {"Training": "stSelectbox", "Compare": "stMultiSelect", "New_run": "stSelectbox"}
        for path, element in (*drawn.items(), ("", "stDataFrame")):
            page.goto(f"{url}/{path}")
            page.wait_for_selector(f'[data-testid="{element}"]', timeout=90_000)
            wait_idle(page)
        busy = page.evaluate(
            "() => Array.from(document.querySelectorAll('style')).some("
            "s => s.textContent.includes('script-state=\"running\"]::before'))"
        )
        assert busy  # a slow page says it is busy: the toolbar that would is hidden
        page.get_by_role("textbox", name="New name").fill("after")
        page.get_by_role("button", name="Rename").click()
        deadline = time.time() + 30
        while store.read_config(runs / "20250101-000000-aaaaaa")["name"] != "after":
            assert time.time() < deadline, "the rename did not happen"
            time.sleep(0.2)
        time.sleep(1)
        wait_idle(page)
        picker = page.get_by_role("combobox", name="Run")
        assert picker.input_value().startswith("after ·"), picker.input_value()
        browser.close()
    assert elsewhere == []  # no font CDN, no telemetry: a local tool stays local
