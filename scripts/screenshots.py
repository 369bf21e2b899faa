"""Takes a screenshot of each dashboard page for the README (docs/screenshots/*.png).

Trains the dashboard's default comparison (full, last_n 1, linear_probe on the built-in data
with builtin weights and New run's defaults: about 4 minutes on a 2-core CPU, the first
time pretraining the builtin weights included) in a temporary runs folder, starts
`streamlit run app.py` on it, and photographs the pages with Debian's Chromium through
Playwright: Training while a run is live, then Compare, Home and New run.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--runs-dir DIR]

With --runs-dir pointing at a folder that already holds a finished group, nothing is
trained. Needs /usr/bin/chromium (never `playwright install`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune_core import runner, store  # noqa: E402
from finetune_core.config import RunConfig  # noqa: E402

# The browser test's server and browser helpers: one way to start and reach the dashboard.
from tests.dashboard_fixtures import CHROMIUM, CHROMIUM_ARGS, free_port, start_server  # noqa: E402

VIEWPORT = {"width": 1280, "height": 860}


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def settle(page, seconds: float = 2.0) -> None:
    """Waits until the page is drawn: no script run shows "Running" and the page's height
    has not changed for `seconds`."""
    page.wait_for_selector("h1", timeout=120_000)
    height = "() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight"
    quiet, last = 0.0, None
    while quiet < seconds:
        busy = page.locator('[data-testid="stStatusWidget"], [data-testid="stSpinner"]').count()
        now = page.evaluate(height)
        quiet = 0.0 if busy or now != last else quiet + 0.2
        last = now
        time.sleep(0.2)


def shoot(page, url: str, path: Path, wait_for: str | None = None) -> None:
    page.goto(url)
    settle(page)
    if wait_for:
        page.wait_for_selector(wait_for, timeout=60_000)
        time.sleep(1.5)  # let Plotly finish drawing
    page.screenshot(path=str(path))
    log(f"saved {path} ({path.stat().st_size // 1024} kB)")


def demo_group(runs: Path, epochs: int) -> list[Path]:
    """Enqueues what New run launches with its defaults."""
    from finetune_core import strategies

    presets = strategies.DEFAULT_COMPARISON
    cfgs = [RunConfig(epochs=epochs, **strategies.preset_fields(p)) for p in presets]
    return runner.enqueue(cfgs, runs, group=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    ap.add_argument("--runs-dir", default=None, help="reuse this runs folder (else a temp one)")
    ap.add_argument("--epochs", type=int, default=RunConfig().epochs)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="finetune-demo-")) / "runs"
    if args.runs_dir:
        runs = Path(args.runs_dir)
    env = dict(
        os.environ, FINETUNE_RUNS_DIR=str(runs), OMP_WAIT_POLICY="PASSIVE", FINETUNE_REFRESH_S="1"
    )
    os.environ.update(env)

    from playwright.sync_api import sync_playwright

    existing = store.list_runs(runs) if runs.exists() else None
    dirs = []
    if existing is None or existing.empty:
        log(f"training a demo group in {runs}")
        dirs = demo_group(runs, args.epochs)
    port = free_port()
    server = start_server(env, port, runs.parent / "screenshots-server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            if dirs:
                live = dirs[1]  # photograph the second run while it trains
                metrics = live / "metrics.jsonl"
                while store.read_status(live)["state"] not in store.FINAL_STATES:
                    if metrics.exists() and '"val"' in metrics.read_text(errors="ignore"):
                        break
                    time.sleep(0.5)
                shoot(
                    page, f"{url}/Training?run={live.name}", out / "training.png", ".js-plotly-plot"
                )
                while any(s in store.LIVE_STATES for s in store.list_runs(runs)["state"]):
                    time.sleep(1)
                log("demo group finished")
            else:
                newest = store.list_runs(runs)["run_id"].iloc[0]
                shoot(page, f"{url}/Training?run={newest}", out / "training.png", ".js-plotly-plot")
            shoot(page, f"{url}/Compare", out / "compare.png", ".js-plotly-plot")
            shoot(page, f"{url}/", out / "home.png")
            shoot(page, f"{url}/New_run", out / "new_run.png", ".js-plotly-plot")
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        for run in store.list_runs(runs).itertuples():  # an interrupted script stops its demo
            if run.state in store.LIVE_STATES:
                runner.stop_run(Path(run.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
