"""Hand-written run folders (config.json, status.json, metrics.jsonl, summary.json exactly as
the run-directory contract says) for the dashboard's page tests, so pages are tested on
known values without training anything."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import numpy as np

from finetune_core import store
from finetune_core.config import RunConfig
from finetune_core.util.processes import process_start_time

CLASSES = ["circle", "square", "triangle"]


def write_run(
    root: Path,
    run_id: str,
    *,
    strategy: str = "full",
    accs: tuple[float, ...] = (0.5, 0.7),
    state: str = "completed",
    group: str | None = None,
    name: str = "",
    trainable: int = 11_000_000,
    total: int = 11_000_000,
    train_time: float = 60.0,
    steps_per_epoch: int = 10,
    total_epochs: int | None = None,
    **cfg_fields,
) -> Path:
    """Writes one run folder; a `running` run is owned by this test process (so it reads as
    live), a final one gets a summary.json. Returns the folder."""
    run_dir = Path(root) / run_id
    run_dir.mkdir(parents=True)
    cfg = RunConfig(
        strategy=strategy, name=name, group=group, epochs=total_epochs or len(accs), **cfg_fields
    ).to_dict()
    cfg["env"] = {"torch": "x", "torchvision": "y", "python": "3.11", "device": "cpu"}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    records = []
    for e, acc in enumerate(accs, start=1):
        for k in (5, 10):
            step = (e - 1) * steps_per_epoch + k
            records.append(
                dict(
                    split="train",
                    epoch=e,
                    step=step,
                    loss=round(2.0 / step, 4),
                    acc=round(acc - 0.1, 4),
                    acc5=None,
                    lr=0.01,
                    time_s=step * 0.5,
                    images_per_s=128.0,
                )
            )
        records.append(
            dict(
                split="val",
                epoch=e,
                step=e * steps_per_epoch,
                loss=round(1.0 / e, 4),
                acc=acc,
                acc5=None,
                lr=0.01,
                time_s=e * steps_per_epoch * 0.5,
                images_per_s=None,
                phase="main",
            )
        )
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    epochs = total_epochs or len(accs)
    now = time.time()
    step = len(accs) * steps_per_epoch
    status = dict(
        state=state,
        pid=None,
        pid_started_at=None,
        created_at=now - 100,
        started_at=now - 90,
        updated_at=now,
        epoch=len(accs),
        step=step,
        total_steps=epochs * steps_per_epoch,
        message="",
    )
    if state == "running":
        status.update(pid=os.getpid(), pid_started_at=process_start_time(os.getpid()))
    (run_dir / "status.json").write_text(json.dumps(status))
    (run_dir / "worker.log").write_text(f"worker for {run_id}\nepoch 1 done\n")
    if state in store.FINAL_STATES:
        cm = [[8, 1, 1], [2, 7, 1], [0, 0, 10]]
        summary = dict(
            state=state,
            best_val_acc=max(accs),
            final_val_acc=accs[-1],
            test_acc=None,
            trainable_params=trainable,
            trainable_params_per_phase=[trainable],
            total_params=total,
            train_time_s=train_time,
            classes=CLASSES,
            per_class_acc={c: round(cm[i][i] / sum(cm[i]), 4) for i, c in enumerate(CLASSES)},
            confusion_matrix=cm,
            skipped_files=[],
            epochs_run=len(accs),
        )
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def write_group(root: Path, group: str = "20250101-120000-abcdef", stamp: str = "20250101-1200"):
    """Writes a finished group of three strategies (full, last_n 1, linear_probe: last_n 1 is
    best at 83 %, full 80 %); returns their run ids in launch order."""
    specs = [
        ("full", (0.6, 0.8), 11_000_000, 100.0, {}),
        ("last_n", (0.55, 0.83), 8_400_000, 70.0, {"unfreeze_last": 1}),
        ("linear_probe", (0.4, 0.5), 1_539, 20.0, {}),
    ]
    ids = []
    for i, (strategy, accs, trainable, t, extra) in enumerate(specs):
        rid = f"{stamp}0{i}-00000{i}"
        write_run(
            root,
            rid,
            strategy=strategy,
            accs=accs,
            group=group,
            trainable=trainable,
            train_time=t,
            **extra,
        )
        ids.append(rid)
    return ids


# ---------------------------------------------------------------- reading Plotly out of AppTest


def _expand(value):
    """Decodes Plotly's base64 typed arrays ({"dtype", "bdata"}) into lists."""
    if isinstance(value, dict):
        if "bdata" in value and "dtype" in value:
            arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
            if "shape" in value:
                shape = [int(s) for s in str(value["shape"]).split(",")]
                arr = arr.reshape(shape)
            return arr.tolist()
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def plotly_figures(at) -> list[dict]:
    """Returns the figure specs (data + layout) of every Plotly chart an AppTest rendered."""
    return [_expand(json.loads(el.proto.spec)) for el in at.get("plotly_chart")]


def figure_titled(at, prefix: str) -> dict:
    """Returns the one rendered figure whose title starts with prefix."""
    found = [f for f in plotly_figures(at) if _title(f).startswith(prefix)]
    titles = [_title(f) for f in plotly_figures(at)]
    assert len(found) == 1, f"expected one chart titled {prefix!r}, got {titles}"
    return found[0]


def _title(fig: dict) -> str:
    title = fig.get("layout", {}).get("title", {})
    return title.get("text", "") if isinstance(title, dict) else str(title)


def make_live(run_dir: Path, pid: int) -> None:
    """Marks a fixture run as running, owned by process pid (alive, so it reads as live)."""
    status = json.loads((run_dir / "status.json").read_text())
    status.update(state="running", pid=pid, pid_started_at=process_start_time(pid))
    (run_dir / "status.json").write_text(json.dumps(status))
    (run_dir / "summary.json").unlink(missing_ok=True)


# ---------------------------------------------------------------- a real Streamlit server

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, port: int, log_path: Path):
    """Starts `streamlit run app.py` on 127.0.0.1:port in its own process group; returns the
    Popen once /_stcore/health answers."""
    import subprocess
    import sys
    import urllib.request

    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
            "--server.fileWatcherType",
            "none",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # Never through a proxy: urlopen's global opener keeps the proxies of its first call.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {log_path.read_text()}")
        try:
            with direct.open(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"streamlit did not answer within 60 s: {log_path.read_text()}")


def kill_server(proc, sig=None) -> None:
    """Kills the server's whole process group (never the workers: they have their own)."""
    import signal

    if proc.returncode is not None:  # already killed and reaped: its pid may be reused
        return
    try:
        os.killpg(proc.pid, sig or signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_idle(page, timeout: float = 60) -> None:
    """Waits until Streamlit has drawn the page and no script run is going on (the status
    widget that says "Running" is gone for a moment)."""
    page.wait_for_selector("h1", timeout=timeout * 1000)
    deadline = time.time() + timeout
    quiet_since = None
    while time.time() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since > 0.8:
            return
        time.sleep(0.1)
    raise TimeoutError("the page kept running")


def plot_points(page, title: str) -> int:
    """Returns how many data points the rendered Plotly chart titled `title` holds."""
    return page.evaluate(
        """(title) => {
            for (const el of document.querySelectorAll('.js-plotly-plot')) {
                const raw = (el.layout && el.layout.title && el.layout.title.text) || '';
                const t = raw.replace(/<[^>]*>/g, '');  // Streamlit's theme bolds titles
                if (t.startsWith(title)) {
                    // _fullData holds the decoded arrays (data may hold base64 typed arrays)
                    return (el._fullData || []).reduce(
                        (n, tr) => n + (tr.x && tr.x.length ? tr.x.length : 0), 0);
                }
            }
            return -1;
        }""",
        title,
    )


def plot_titles(page) -> list[str]:
    """Returns the titles of every rendered Plotly chart on the page."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(
            el => ((el.layout && el.layout.title && el.layout.title.text) || '')
                .replace(/<[^>]*>/g, ''))"""
    )


def plot_traces(page, title: str) -> list[dict]:
    """Returns the traces of the rendered Plotly chart whose title starts with `title`: name,
    fill, points (len of x), yaxis; [] when no such chart is drawn."""
    return page.evaluate(
        """(title) => {
            for (const el of document.querySelectorAll('.js-plotly-plot')) {
                const raw = (el.layout && el.layout.title && el.layout.title.text) || '';
                if (raw.replace(/<[^>]*>/g, '').startsWith(title)) {
                    return (el._fullData || []).map(tr => ({
                        name: tr.name || '', fill: tr.fill || 'none',
                        points: tr.x && tr.x.length ? tr.x.length : 0, yaxis: tr.yaxis || 'y'}));
                }
            }
            return [];
        }""",
        title,
    )
