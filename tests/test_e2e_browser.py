"""The dashboard in a real browser: Debian's Chromium driven by Playwright against
`streamlit run app.py` on 127.0.0.1. A new user's path: New run -> launch a comparison
group -> watch it train live (no reload needed; a reload loses nothing) -> Compare.

Needs /usr/bin/chromium (`apt-get install chromium`; never `playwright install`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from dashboard_fixtures import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    free_port,
    kill_server,
    plot_points,
    plot_titles,
    plot_traces,
    start_server,
    wait_idle,
)
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from finetune_core import runner, store


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """One Streamlit server and one Chromium for every test of the module (each starts in
    seconds, but seconds add up on 2 cores); `server` gives each test an empty runs folder."""
    base = tmp_path_factory.mktemp("e2e")
    runs = base / "runs"
    env = dict(os.environ)
    env.update(
        FINETUNE_RUNS_DIR=str(runs),
        TORCH_HOME=str(base / "torch"),
        FINETUNE_REFRESH_S="1",  # progress every 1 s, charts (tested below to move) every 2 s
        FINETUNE_CHART_REFRESH_S="2",
        # browser, server and worker share 2 cores: OpenMP threads that spin while waiting
        # for a core can make a training step 30x slower
        OMP_WAIT_POLICY="PASSIVE",
        # the data folder is the session's (conftest), so built-in data is generated once
        FINETUNE_DATA_DIR=os.environ.get("FINETUNE_DATA_DIR", str(base / "data")),
    )
    port = free_port()
    proc = start_server(env, port, base / "server.log")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield SimpleNamespace(
                url=f"http://127.0.0.1:{port}", runs=runs, env=env, base=base, browser=browser
            )
            browser.close()
    finally:
        kill_server(proc)


def _leave_nothing_running(runs: Path) -> None:
    """Stops the runs a test left live and the folder's supervisor (never a worker behind)."""
    if not runs.is_dir():
        return
    for run in store.list_runs(runs).itertuples():
        if run.state in store.LIVE_STATES:
            runner.stop_run(Path(run.path))
    deadline = time.time() + 60
    while time.time() < deadline and any(
        s in store.LIVE_STATES for s in store.list_runs(runs)["state"]
    ):
        time.sleep(0.5)
    lock = runs / runner.SUPERVISOR_LOCK
    if runner.supervisor_running(runs) and lock.read_text().strip():
        os.kill(int(lock.read_text().strip()), 15)


@pytest.fixture
def server(app):
    """(url, runs folder) of the shared server, the folder empty; what the test leaves is
    stopped and moved aside afterwards, so tests never see each other's runs."""
    app.runs.mkdir(parents=True, exist_ok=True)
    yield app.url, app.runs
    _leave_nothing_running(app.runs)
    app.runs.rename(app.base / f"runs-{time.time_ns()}")


@pytest.fixture
def page(app, tmp_path):
    """A fresh tab of the shared browser; its last look is saved in the test's folder."""
    context = app.browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    yield tab
    tab.screenshot(path=tmp_path / "last.png")
    context.close()


def choose(page, label: str, option: str) -> None:
    exact = page.locator('[data-testid="stWidgetLabel"]').get_by_text(label, exact=True)
    box = page.locator('[data-testid="stSelectbox"]').filter(has=exact)
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


def test_new_user_launches_a_comparison_watches_it_live_and_reads_the_answer(server, page):
    url, runs = server
    try:
        user_journey(page, url, runs)
    except BaseException:
        for run in store.list_runs(runs).itertuples():
            print(run.run_id, store.read_status(Path(run.path)))
            print(store.read_log_tail(Path(run.path), 10))
        raise


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
    # A comparison tunes each strategy's lr first (a range test and three short trials,
    # minutes on a busy CPU); the live charts are those of the training that follows.
    deadline = time.time() + 600
    while time.time() < deadline:
        status = store.read_status(runs / run_id)
        state = status.get("state")
        if state in store.FINAL_STATES or (state == "running" and status.get("step", 0) > 0):
            break  # training (or over: the assertion below says how)
        time.sleep(0.5)
    assert status.get("state") == "running", status
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
    deadline = time.time() + 900  # each run searches its lr first
    headline = ""
    while time.time() < deadline:
        done = all(s in store.FINAL_STATES for s in store.list_runs(runs)["state"])
        heads = page.locator("h3").all_inner_texts()
        headline = next((h for h in heads if "is best with" in h or "within noise" in h), "")
        still = page.get_by_text("still training").count()
        if done and headline and not still:
            break
        time.sleep(1)
    assert set(store.list_runs(runs)["state"]) == {"completed"}
    # a winner, or (tuned, the strategies often are) two within noise, never a winner inside it
    assert re.search(
        r"is best with \d+\.\d % (val|test) accuracy|are within noise of each other: "
        r"\d+\.\d % and \d+\.\d % (val|test) accuracy",
        headline,
    ), headline
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


def test_home_rename_reads_back_in_the_picker_and_no_page_asks_another_host(server, page):
    from dashboard_fixtures import write_run

    url, runs = server
    write_run(runs, "20250101-000000-aaaaaa", name="before")
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
    assert elsewhere == []  # no font CDN, no telemetry: a local tool stays local


def test_a_two_seed_depth_sweep_shows_bands_the_noise_and_how_much_to_unfreeze(app, server, page):
    """The real CLI sweeps every unfreeze depth of a small model (4 backbone groups) with two
    seeds and a test split; Compare then draws each strategy as its seeds' mean in a band,
    calls no winner inside the noise, and draws the depth view, all by test accuracy."""
    url, runs = server
    env = {**app.env, "FINETUNE_MAX_PARALLEL": "4"}  # 10 tiny runs: mostly process starts
    sweep = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_core",
            "sweep",
            "--depths",
            "--model",
            "squeezenet1_1",
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--weights",
            "none",
            "--augment",
            "none",
            "--test-fraction",
            "0.2",
            "--same-lr",  # no lr tuning: this test is about what Compare shows
            "--runs-dir",
            str(runs),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    group = sweep.stdout.strip().splitlines()[-1]
    assert len(store.list_runs(runs)) == 10  # last_n 0..3 and full, two seeds each

    page.goto(f"{url}/Compare?group={group}")
    page.wait_for_selector(".js-plotly-plot", timeout=90_000)
    wait_idle(page)
    deadline = time.time() + 60
    while time.time() < deadline:  # the charts below the fold may still be drawing
        bands = [t for t in plot_traces(page, "Val accuracy (%) by epoch") if t["fill"] == "toself"]
        depth = plot_traces(page, "How much to unfreeze")
        if len(bands) == 5 and depth:
            break
        time.sleep(0.5)
    heads = page.locator("h3").all_inner_texts()
    headline = next((h for h in heads if "within noise" in h or "is best" in h), "")
    # near-chance runs (1 epoch from random weights): their gaps are noise on 300 images
    assert "are within noise of each other" in headline, headline
    assert "test accuracy (means over seeds)" in headline and "× 2 seeds" in headline
    assert "so neither wins" in headline
    assert len(bands) == 5, plot_traces(page, "Val accuracy (%) by epoch")
    assert all("min–max over 2 seeds" in b["name"] for b in bands)
    names = [t["name"] for t in depth]
    assert "top k groups (last_n): test accuracy, 95 % interval" in names, names
    accuracy = next(t for t in depth if t["name"].startswith("top k groups"))
    assert accuracy["points"] == 5  # the probe, 1, 2, 3 groups, full
    memory = [t for t in depth if t["name"].startswith("peak memory")]
    assert memory and memory[0]["yaxis"] == "y3" and memory[0]["points"] == 5
    said = page.locator('[data-testid="stMarkdownContainer"]')
    unfreeze = said.filter(has_text="How much to unfreeze:").first.inner_text()
    assert "within noise of" in unfreeze and "test accuracy" in unfreeze, unfreeze
    front = plot_traces(page, "Accuracy vs trainable parameters")
    assert [t["name"] for t in front] == ["last_n 0", "last_n 1", "last_n 2", "last_n 3", "full"]
    assert page.get_by_text("the mean ± standard deviation over its seeds").count() == 1


_FIGURES = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => ({
    title: ((el.layout && el.layout.title && el.layout.title.text) || '').replace(/<[^>]*>/g, ''),
    traces: (el._fullData || []).map(tr => ({
        type: tr.type, name: tr.name || '',
        x: tr.x ? Array.from(tr.x) : [], y: tr.y ? Array.from(tr.y) : [],
        customdata: tr.customdata ? Array.from(tr.customdata, r => Array.from(r)) : []})),
    shapes: ((el.layout && el.layout.shapes) || []).map(s => ({name: s.name || '', x0: s.x0})),
    notes: ((el.layout && el.layout.annotations) || []).map(a => a.text || '')}))"""


def test_a_gradual_run_shows_its_weight_drift_and_phase_markers_on_training(app, server, page):
    """A real gradual run of the CLI (2 epochs, half an epoch of warm-up): Training draws its
    weight drift as a heatmap (layer4 exactly 0 in the probe epoch, moved once unfrozen) and
    marks the unfreezing and the end of warm-up on its loss, accuracy and lr charts."""
    url, runs = server
    args = ["--strategy", "gradual", "--epochs", "2", "--warmup-epochs", "0.5"]
    tiny = ["--image-size", "32", "--weights", "none", "--augment", "none", "--batch-size", "64"]
    done = subprocess.run(
        [sys.executable, "-m", "finetune_core", "train", *args, *tiny, "--runs-dir", str(runs)],
        env=app.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    per_epoch = int(store.read_metrics(run_dir).query("split == 'val'")["step"].iloc[0])
    recorded = store.read_drift(run_dir)

    page.goto(f"{url}/Training?run={run_dir.name}")
    page.wait_for_selector(".js-plotly-plot", timeout=90_000)
    wait_idle(page)
    deadline = time.time() + 60
    while True:  # the heatmap is drawn under the four charts
        figures = {f["title"]: f for f in page.evaluate(_FIGURES)}
        drift = next((f for t, f in figures.items() if t.startswith("Weight drift")), None)
        if drift or time.time() > deadline:
            break
        time.sleep(0.5)
    assert drift, list(figures)
    coloured = next(t for t in drift["traces"] if t["name"].endswith("drift"))
    assert coloured["type"] == "heatmap"
    groups = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert coloured["y"] == groups and [int(x) for x in coloured["x"]] == [1, 2]
    layer4 = coloured["customdata"][groups.index("layer4")]
    assert layer4[0][0] == 0 and layer4[1][0] > 0  # frozen in epoch 1, unfrozen in epoch 2
    assert [row[1][0] for row in coloured["customdata"]] == pytest.approx(
        recorded[recorded["epoch"] == 2]["drift"].tolist()
    )
    expected = {
        "phase: unfreeze layer4": per_epoch,
        "warmup: end of warm-up": round(0.5 * per_epoch),
    }
    for title in ("Loss", "Accuracy", "Learning rate"):
        chart = next(f for t, f in figures.items() if t.startswith(title))
        assert {s["name"]: s["x0"] for s in chart["shapes"]} == expected, (title, chart["shapes"])
        assert {"unfreeze layer4", "end of warm-up"} <= set(chart["notes"])


def test_a_clicked_confusion_cell_shows_its_images_and_the_report_opens_offline(app, server, page):
    """Two tiny real runs (the CLI, side by side: squeezenet starts fastest); on Compare a click on a confusion cell
    shows that cell's images with their classes and confidence, and the report the button
    downloads is the CLI's, byte for byte, and draws its charts with every request refused."""
    url, runs = server
    trains = [
        subprocess.Popen(
            [sys.executable, "-m", "finetune_core", "train", "--strategy", strategy]
            + ["--model", "squeezenet1_1", "--data", "builtin:shapes", "--weights", "none"]
            + ["--image-size", "32"]
            + ["--epochs", "1", "--augment", "none", "--runs-dir", str(runs)],
            env=app.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for strategy in ("full", "linear_probe")
    ]
    ids = []
    for proc in trains:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        ids.append(Path(out.strip().splitlines()[-1]).name)
    summary = store.read_summary(runs / ids[0])
    cm, classes = summary["confusion_matrix"], summary["classes"]
    # the cell to click: full's biggest mistake (a right answer when it made none)
    t, p = max(
        ((i, j) for i in range(len(cm)) for j in range(len(cm))),
        key=lambda c: (c[0] != c[1] and cm[c[0]][c[1]] > 0, cm[c[0]][c[1]]),
    )

    page.goto(f"{url}/Compare?runs={','.join(ids)}")
    page.wait_for_selector(".js-plotly-plot", timeout=90_000)
    wait_idle(page)
    chart = page.locator(".js-plotly-plot").filter(has_text="Confusion matrices")
    chart.scroll_into_view_if_needed()
    deadline = time.time() + 30
    where = None
    while where is None and time.time() < deadline:  # the chart's axes, once it is drawn
        where = page.evaluate(
            """([row, col]) => {
                for (const el of document.querySelectorAll('.js-plotly-plot')) {
                    const t = ((el.layout && el.layout.title && el.layout.title.text) || '')
                        .replace(/<[^>]*>/g, '');
                    if (!t.startsWith('Confusion matrices') || !el._fullLayout.xaxis) continue;
                    const xa = el._fullLayout.xaxis, ya = el._fullLayout.yaxis;
                    const box = el.getBoundingClientRect();
                    return {x: box.left + xa._offset + xa.l2p(col),
                            y: box.top + ya._offset + ya.l2p(row)};
                }
                return null;
            }""",
            [t, p],
        )
        time.sleep(0.3)
    assert where, plot_titles(page)
    page.mouse.move(where["x"] + 3, where["y"] + 3)  # off the cell's centre: still that cell
    page.mouse.click(where["x"] + 3, where["y"] + 3)
    what = f"{classes[t]} predicted right" if t == p else f"{classes[t]} predicted as {classes[p]}"
    heading = page.locator('[data-testid="stMarkdownContainer"]').filter(has_text=what)
    heading.first.wait_for(timeout=30_000)
    wait_idle(page)
    assert f"{cm[t][p]} val image" in heading.first.inner_text()
    assert [
        page.get_by_role("combobox", name=n).input_value()
        for n in ("Strategy", "True class", "Predicted as")
    ] == ["full", classes[t], classes[p]]
    images = page.locator('[data-testid="stImage"] img')
    deadline = time.time() + 30
    while images.count() < min(cm[t][p], 32) and time.time() < deadline:
        time.sleep(0.3)
    assert images.count() == min(cm[t][p], 32)
    assert images.first.evaluate("img => img.complete && img.naturalWidth") == 32  # its pixels
    captions = page.locator('[data-testid="stImageCaption"]').all_inner_texts()
    assert captions and all(re.fullmatch(r".+ · \d+ % · #\d+", c) for c in captions), captions

    # the report: the button's file is the CLI's, and it draws offline
    cli = subprocess.run(
        [sys.executable, "-m", "finetune_core", "report", *ids, "--runs-dir", str(runs)],
        env=app.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    written = Path(cli.stdout.strip().splitlines()[-1])
    button = page.get_by_role("button", name="Download the report (HTML)")
    button.scroll_into_view_if_needed()
    with page.expect_download(timeout=60_000) as download:
        button.click()
    assert Path(download.value.path()).read_bytes() == written.read_bytes()
    assert download.value.suggested_filename == written.name
    offline = app.browser.new_context(offline=True)
    asked, errors = [], []
    target = written.as_uri()
    offline.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url == target
            else (asked.append(route.request.url), route.abort())
        ),
    )
    tab = offline.new_page()
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(target)
    figures = written.read_text().count("Plotly.newPlot(")
    tab.wait_for_function(
        f"() => document.querySelectorAll('.js-plotly-plot').length == {figures}", timeout=30_000
    )
    assert figures >= 9 and asked == [] and errors == []
    offline.close()


# ---------------------------------------------------------------- Predict and export (issue 13)


def test_predict_shows_an_uploaded_images_class_and_an_onnx_export_downloads(app, server, page):
    """A tiny real run (the CLI): Predict shows an uploaded image as the model saw it with
    the class load_model predicts for it; Training exports the run as ONNX, the browser
    downloads the file, and onnxruntime gives the run's logits with it."""
    import numpy as np
    import onnxruntime
    import torch

    import finetune_core
    from finetune_core.data import shapes

    url, runs = server
    done = subprocess.run(
        [sys.executable, "-m", "finetune_core", "train", "--model", "squeezenet1_1"]
        + ["--data", "builtin:shapes", "--weights", "none", "--image-size", "32"]
        + ["--epochs", "1", "--augment", "none", "--runs-dir", str(runs)],
        env=app.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    image = app.base / "held-out"
    if not image.exists():
        shapes.generate("shapes", image, seed=5, per_class=1)
    photo = image / "star" / "0000.png"
    model = finetune_core.load_model(run_dir)
    (cls, prob), *_ = model.predict([photo])[0]

    page.goto(f"{url}/Predict?run={run_dir.name}")
    wait_idle(page, timeout=120)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(photo))
    said = page.locator('[data-testid="stMarkdownContainer"]').filter(has_text=f"{cls} ")
    said.filter(has_text=f"{100 * prob:.1f} %").first.wait_for(timeout=120_000)
    wait_idle(page)
    shown = page.locator('[data-testid="stImage"] img').first
    assert shown.evaluate("img => img.complete && img.naturalWidth") == 32  # the model's input
    assert page.get_by_text("1 image predicted").count() == 1
    assert page.locator('[data-testid="stException"]').count() == 0

    page.goto(f"{url}/Training?run={run_dir.name}")
    wait_idle(page, timeout=120)
    page.get_by_text("ONNX", exact=True).click()
    wait_idle(page)
    page.get_by_role("button", name="Export as ONNX").click()
    button = page.get_by_role("button", name=re.compile(r"Download model\.onnx \(.+ MB\)"))
    button.wait_for(timeout=180_000)
    with page.expect_download(timeout=60_000) as download:
        button.click()
    saved = Path(download.value.path())
    assert saved.read_bytes() == (run_dir / "export" / "model.onnx").read_bytes()
    assert page.locator('[data-testid="stException"]').count() == 0
    session = onnxruntime.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        got = session.run(None, {"input": x.numpy()})[0]
        assert np.abs(got - model.model(x).numpy()).max() <= 1e-4
