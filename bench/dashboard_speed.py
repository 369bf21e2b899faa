"""How fast the dashboard answers, and what watching a run costs it, in a real browser.

    PYTHONPATH=. .venv/bin/python bench/dashboard_speed.py pages     # page loads, form changes
    PYTHONPATH=. .venv/bin/python bench/dashboard_speed.py watch     # server CPU, run speed

`pages`: starts `streamlit run app.py` on a runs folder with a finished comparison group,
opens each page in Debian's Chromium (Playwright) several times and times each load from
navigation until the script run is over (`.stApp[data-test-script-state="notRunning"]`
with the page's title and charts drawn); then times form changes on New run. Reports the
first load (imports, caches) and the median of the others. Target: every page and every
form change under 2 s and 0.5 s on an idle 2-core machine.

`watch`: trains a real run (ResNet-18, builtin:shapes, 32 px) through the queue and reads
the server process's CPU time from /proc while no tab, then one Training tab, shows it (and
the Chromium processes' CPU: the browser shares the machine with the run too). Target: at
most 3 s of server CPU per minute with the tab open. Then it trains short runs in
interleaved pairs, with and without a Training tab open, and compares their images/s after
the first epoch (which holds the warm-up and the page's first load).
Target: within the noise, i.e. pairs on both sides of 0 (a sign test; with 5 pairs, all on
one side happens by chance 6 % of the time) and a median difference no larger than the
spread of the runs without a tab.

Needs /usr/bin/chromium and playwright (requirements-dev.txt), like the browser tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dashboard_fixtures import (  # noqa: E402  (the browser tests' server helpers)
    CHROMIUM,
    CHROMIUM_ARGS,
    free_port,
    kill_server,
    start_server,
    write_group,
)

from finetune_core import runner, store  # noqa: E402
from finetune_core.config import RunConfig  # noqa: E402

IDLE = '.stApp[data-test-script-state="notRunning"]'
PAGES = {  # path -> (what must be drawn, number of Plotly charts)
    "": ("h1", 0),
    "New_run": ("h1", 3),
    "Training": ("h1", 4),
    "Compare": ("h1", 6),
}


def cpu_seconds(pid: int) -> float:
    """Returns the CPU time (user + system) process pid has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def browser_cpu_seconds() -> float:
    """Returns the CPU time the Chromium processes on this machine have used so far."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(chrom" in text:
            total += cpu_seconds(int(stat.parent.name))
    return total


def load_time(page, url: str, charts: int, timeout: float = 120) -> float:
    """Returns the seconds from navigating to url until its script run is over and its
    charts are drawn."""
    t0 = time.perf_counter()
    page.goto(url, wait_until="commit")
    page.wait_for_selector(f"{IDLE} h1", timeout=timeout * 1000)
    if charts:
        page.wait_for_function(
            f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= {charts}",
            timeout=timeout * 1000,
        )
    page.wait_for_selector(f"{IDLE} h1", timeout=timeout * 1000)
    return time.perf_counter() - t0


def watch_runs(page) -> None:
    """Records every change of the app's script state, with its time, in window.__runs."""
    page.evaluate(
        """() => {
            window.__runs = [];
            const app = document.querySelector('.stApp');
            new MutationObserver(() => window.__runs.push(
                [performance.now(), app.getAttribute('data-test-script-state')]
            )).observe(app, {attributes: true, attributeFilter: ['data-test-script-state']});
        }"""
    )


def change_time(page, act, timeout: float = 60) -> float:
    """Returns the seconds from an action on the page until the script run it starts ends."""
    watch_runs(page)
    t0 = page.evaluate("() => performance.now()")
    act()
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = page.evaluate("() => window.__runs")
        started = [i for i, (_, s) in enumerate(runs) if s == "running"]
        if started and any(s == "notRunning" for _, s in runs[started[0] :]):
            end = next(t for t, s in runs[started[0] :] if s == "notRunning")
            return (end - t0) / 1000
        time.sleep(0.02)
    raise TimeoutError("the change started no script run that ended")


def bench_pages(args) -> dict:
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="bench-pages-"))
    runs = work / "runs"
    runs.mkdir()
    group = "20250101-120000-abcdef"
    write_group(runs, group)
    env = {**os.environ, "FINETUNE_RUNS_DIR": str(runs), "PYTHONPATH": str(ROOT)}
    port = free_port()
    server = start_server(env, port, work / "server.log")
    url = f"http://127.0.0.1:{port}"
    out: dict = {"pages": {}, "changes": {}}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            query = {"Training": "?run=20250101-120000-000000", "Compare": f"?group={group}"}
            for path, (_, charts) in PAGES.items():
                times = [
                    load_time(page, f"{url}/{path}{query.get(path, '')}", charts)
                    for _ in range(args.loads)
                ]
                out["pages"][path or "Home"] = {"first": times[0], "later": times[1:]}
                print(
                    f"{path or 'Home':<10} first {times[0]:5.2f} s, then median "
                    f"{statistics.median(times[1:]):5.2f} s",
                    flush=True,
                )
            load_time(page, f"{url}/New_run", PAGES["New_run"][1])
            for name, act in (
                ("epochs", lambda v: _set_number(page, "Epochs", v)),
                ("learning rate", lambda v: _set_number(page, "Learning rate (head)", v)),
            ):
                values = [2, 3] * args.loads if name == "epochs" else [0.02, 0.01] * args.loads
                times = [change_time(page, lambda v=v, act=act: act(v)) for v in values]
                out["changes"][name] = times
                print(
                    f"change {name:<14} median {statistics.median(times):5.2f} s "
                    f"(max {max(times):.2f} s)",
                    flush=True,
                )
            browser.close()
    finally:
        kill_server(server)
    return out


def _set_number(page, label: str, value) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")


def _run_config(epochs: int) -> RunConfig:
    return RunConfig(
        data="builtin:shapes",
        model="resnet18",
        weights="none",
        strategy="full",
        image_size=32,
        batch_size=32,
        epochs=epochs,
        augment="flip",
    )


def _wait_running(run_dir: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while store.read_status(run_dir).get("step", 0) < 5:
        if time.time() > deadline:
            raise TimeoutError(store.read_log_tail(run_dir))
        time.sleep(0.5)


def _wait_done(run_dir: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while store.read_status(run_dir).get("state") in store.LIVE_STATES:
        if time.time() > deadline:
            raise TimeoutError(store.read_log_tail(run_dir))
        time.sleep(0.5)


def _run_speed(run_dir: Path) -> float:
    """Returns the run's median images/s after its first epoch, which holds the warm-up and,
    with a tab, the page's first load (the cost of watching is what follows)."""
    frame = store.read_metrics(run_dir)
    train = frame[(frame["split"] == "train") & (frame["epoch"] > 1)]
    return float(train["images_per_s"].dropna().median())


def bench_watch(args) -> dict:
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    runs = work / "runs"
    env = {**os.environ, "FINETUNE_RUNS_DIR": str(runs), "PYTHONPATH": str(ROOT)}
    port = free_port()
    server = start_server(env, port, work / "server.log")
    url = f"http://127.0.0.1:{port}"
    out: dict = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            (run_dir,) = runner.enqueue([_run_config(epochs=200)], runs)
            _wait_running(run_dir)
            before = cpu_seconds(server.pid)
            time.sleep(args.seconds)
            out["no_tab_cpu_s_per_min"] = (cpu_seconds(server.pid) - before) * 60 / args.seconds
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            load_time(page, f"{url}/Training?run={run_dir.name}", 4)
            time.sleep(3)
            before, browser_before = cpu_seconds(server.pid), browser_cpu_seconds()
            time.sleep(args.seconds)
            out["tab_cpu_s_per_min"] = (cpu_seconds(server.pid) - before) * 60 / args.seconds
            out["browser_cpu_s_per_min"] = (
                (browser_cpu_seconds() - browser_before) * 60 / args.seconds
            )
            print(
                f"server CPU per minute, a live run: no tab "
                f"{out['no_tab_cpu_s_per_min']:.1f} s, one Training tab "
                f"{out['tab_cpu_s_per_min']:.1f} s (the browser showing it: "
                f"{out['browser_cpu_s_per_min']:.1f} s)",
                flush=True,
            )
            page.close()
            runner.stop_run(run_dir)
            _wait_done(run_dir)

            pairs = []
            for i in range(args.pairs):
                speeds = {}
                order = ("tab", "none") if i % 2 else ("none", "tab")
                for kind in order:
                    (d,) = runner.enqueue([_run_config(epochs=args.pair_epochs)], runs)
                    tab = None
                    if kind == "tab":
                        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
                        tab.goto(f"{url}/Training?run={d.name}")
                    _wait_done(d)
                    if tab is not None:
                        tab.close()
                    speeds[kind] = _run_speed(d)
                pairs.append(speeds)
                print(
                    f"pair {i + 1}: no tab {speeds['none']:.1f} img/s, "
                    f"Training tab {speeds['tab']:.1f} img/s",
                    flush=True,
                )
            browser.close()
            diffs = [100 * (s["tab"] / s["none"] - 1) for s in pairs]
            alone = [s["none"] for s in pairs]
            out["pairs"] = pairs
            out["tab_vs_none_pct"] = {
                "median": statistics.median(diffs),
                "min": min(diffs),
                "max": max(diffs),
            }
            # the runs without a tab vary among themselves too: that is the noise
            out["no_tab_spread_pct"] = 100 * (max(alone) - min(alone)) / statistics.median(alone)
            # a sign test: with no effect, all pairs on one side of 0 happens 2 / 2**pairs
            one_side = min(diffs) > 0 or max(diffs) < 0
            out["within_noise"] = not one_side
            print(
                f"images/s with a Training tab vs without: median {statistics.median(diffs):+.1f} "
                f"% (pairs from {min(diffs):+.1f} to {max(diffs):+.1f} %; the runs without a tab "
                f"spread over {out['no_tab_spread_pct']:.1f} %): "
                + (
                    f"every pair on one side of 0 (p = {2 / 2 ** len(diffs):.2f})"
                    if one_side
                    else "within the noise (pairs on both sides of 0)"
                ),
                flush=True,
            )
    finally:
        kill_server(server)
        for r in store.list_runs(runs).itertuples():
            if r.state in store.LIVE_STATES:
                runner.stop_run(Path(r.path))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pages", help="page loads and form changes")
    p.add_argument("--loads", type=int, default=5, help="loads of each page (the first apart)")
    w = sub.add_parser("watch", help="server CPU while a tab shows a live run; run speed")
    w.add_argument("--seconds", type=float, default=60.0, help="length of each CPU window")
    w.add_argument("--pairs", type=int, default=5, help="interleaved pairs of short runs")
    w.add_argument("--pair-epochs", type=int, default=5, help="epochs of each short run")
    for q in (p, w):
        q.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = bench_pages(args) if args.what == "pages" else bench_watch(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
