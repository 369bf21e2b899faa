"""The run directory: atomic JSON files, appended metrics, and readers that return DataFrames.

runs/<run_id>/ holds config.json, status.json, metrics.jsonl, summary.json, checkpoints/
and worker.log (see DESIGN.md and issue 2 section 6). Every JSON file is replaced
atomically (temp file in the same folder, fsync, os.replace); metrics.jsonl is only
appended to. Whoever reads a status whose process is gone without a final state writes
"crashed", so a run never stays "running" after its worker died.

This module imports neither torch nor the engine at import time, so that listing runs
stays fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import re
import secrets
import shutil
import tempfile
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from finetune_core.config import RunConfig, strategy_label

# queued: waiting for the supervisor; running: a worker process owns the run.
LIVE_STATES = ("queued", "running")
# A final state has no process behind it; stopped, crashed and failed runs can be resumed.
FINAL_STATES = ("completed", "failed", "stopped", "crashed")
STATES = LIVE_STATES + FINAL_STATES
RESUMABLE_STATES = ("stopped", "crashed", "failed")

CRASHED_MESSAGE = (
    "the worker process ended without a final state; resume to continue from the last checkpoint"
)

RUN_ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")

METRIC_COLUMNS = {
    "split": "string",
    "epoch": "Int64",
    "step": "Int64",
    "loss": "float64",
    "acc": "float64",
    "acc5": "float64",
    "lr": "float64",
    "time_s": "float64",
    "images_per_s": "float64",
    "phase": "string",
}

LIST_COLUMNS = [
    "run_id",
    "name",
    "model",
    "strategy",
    "state",
    "best_val_acc",
    "trainable_pct",
    "train_time_s",
    "disk_bytes",
    "group",
    "created_at",
    "path",
]

SUMMARY_KEYS = (
    "state",
    "best_val_acc",
    "final_val_acc",
    "test_acc",
    "trainable_params",
    "trainable_params_per_phase",
    "total_params",
    "train_time_s",
    "classes",
    "per_class_acc",
    "confusion_matrix",
    "skipped_files",
)


class RunError(ValueError):
    """A run reference that matches no run or several, or an action the run's state forbids."""


# ---------------------------------------------------------------------------------------------
# Paths and ids


def runs_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Returns the absolute runs folder: explicit, else $FINETUNE_RUNS_DIR, else ./runs."""
    path = explicit or os.environ.get("FINETUNE_RUNS_DIR") or "runs"
    return Path(path).expanduser().resolve()


default_runs_dir = runs_dir  # for functions whose runs_dir parameter shadows the name


def new_run_id(now: float | None = None) -> str:
    """Returns a fresh run id: YYYYMMDD-HHMMSS-xxxxxx (local time, 6 random hex digits)."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now)
    return f"{stamp:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def new_group_id() -> str:
    """Returns an id shared by runs launched together (same format as a run id)."""
    return new_run_id()


# ---------------------------------------------------------------------------------------------
# Atomic JSON


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Writes data as JSON to path so that readers see the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(data), f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _jsonable(value: Any) -> Any:
    """Returns value with NaN/inf turned into null and numpy/torch scalars into Python ones."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy arrays/scalars, torch tensors
        return _jsonable(value.tolist())
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)


def read_json(path: str | os.PathLike) -> Any:
    """Returns the parsed JSON file, or None when it is missing or not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Processes: is the worker that owns a run still the same live process?


@lru_cache(maxsize=1)
def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _proc_stat(pid: int) -> list[str] | None:
    """Returns the fields of /proc/<pid>/stat after the command name, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    return text[text.rfind(")") + 2 :].split()


def process_start_time(pid: int) -> float | None:
    """Returns when process pid started (seconds since the epoch), or None where unknown."""
    fields = _proc_stat(pid)
    boot = _boot_time()
    if not fields or boot is None:
        return None
    # fields[0] is field 3 (state); field 22 (starttime, in clock ticks since boot) is [19].
    ticks = int(fields[19])
    return round(boot + ticks / os.sysconf("SC_CLK_TCK"), 2)


def process_alive(pid: int | None, started_at: float | None = None) -> bool:
    """Returns True when pid runs and, where started_at is known, is the process started then."""
    if not pid or pid <= 0:
        return False
    if Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X"):  # gone, or a zombie nobody reaped yet
            return False
        if started_at is not None:
            now_started = process_start_time(pid)
            if now_started is not None and abs(now_started - float(started_at)) > 0.05:
                return False  # the pid was reused by another process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Environment recorded in config.json


@lru_cache(maxsize=8)
def device_name(device: str = "auto") -> str:
    """Returns a readable name of the device a run with `device` uses.

    Asks CUDA for the name only when CUDA is available, so that creating a run on a
    machine without a GPU never initialises CUDA.
    """
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    mps = getattr(torch.backends, "mps", None)
    if device in ("auto", "mps") and mps is not None and mps.is_available():
        return "Apple MPS"
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def environment(device: str = "auto") -> dict[str, str]:
    """Returns torch, torchvision and Python versions and the device name."""
    import torch
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
    }


# ---------------------------------------------------------------------------------------------
# Creating runs, status


@contextlib.contextmanager
def _status_lock(run_dir: Path):
    """Serialises read-modify-write of status.json between processes (worker, supervisor, UI)."""
    fd = os.open(run_dir / ".status.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _absolute_local_path(spec: str, keep_prefixes: tuple[str, ...]) -> str:
    if spec in keep_prefixes or spec.startswith(keep_prefixes):
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def create_run(
    cfg: RunConfig,
    runs_dir: str | os.PathLike,
    *,
    group: str | None = None,
    owner_pid: int | None = None,
) -> Path:
    """Returns the new run folder with config.json and status.json ("queued").

    Relative data and weights paths are made absolute, so a worker started from another
    folder finds them. With owner_pid (the CLI running it in the foreground), the run
    starts as "running", owned by that process, so no supervisor picks it up.
    """
    root = Path(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    while True:
        run_id = new_run_id()
        run_dir = root / run_id
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            continue
    conf = cfg.to_dict()
    conf["data"] = _absolute_local_path(cfg.data, ("builtin:", "torchvision:"))
    conf["weights"] = _absolute_local_path(cfg.weights, ("default", "none", "builtin", "run:"))
    conf["group"] = group if group is not None else cfg.group
    conf["env"] = environment(cfg.device)
    write_json_atomic(run_dir / "config.json", conf)
    now = time.time()
    status = {
        "state": "queued",
        "pid": None,
        "pid_started_at": None,
        "created_at": now,
        "started_at": None,
        "updated_at": now,
        "epoch": 0,
        "step": 0,
        "total_steps": None,
        "message": "waiting for the queue",
        "resume": False,
    }
    if owner_pid is not None:
        status.update(
            state="running",
            pid=owner_pid,
            pid_started_at=process_start_time(owner_pid),
            message="starting",
        )
    write_json_atomic(run_dir / "status.json", status)
    return run_dir


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Returns config.json as a dict; raises RunError when it is missing or unreadable."""
    data = read_json(Path(run_dir) / "config.json")
    if not isinstance(data, dict):
        raise RunError(f"{run_dir} is not a run folder: config.json is missing or unreadable")
    return data


def run_config(run_dir: str | os.PathLike) -> RunConfig:
    """Returns the RunConfig stored in a run folder."""
    from finetune_core.config import from_dict

    return from_dict(read_config(run_dir))


def _read_status_file(run_dir: Path) -> dict[str, Any]:
    data = read_json(run_dir / "status.json")
    return data if isinstance(data, dict) else {}


def _is_orphaned(status: dict[str, Any]) -> bool:
    return status.get("state") == "running" and not process_alive(
        status.get("pid"), status.get("pid_started_at")
    )


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Returns status.json; a "running" run whose process is gone or reused becomes "crashed".

    The crash is written to the file (under the status lock, after re-reading it, so a
    worker that wrote its final state just before exiting is never marked crashed).
    """
    run_dir = Path(run_dir)
    status = _read_status_file(run_dir)
    if not status:
        return {"state": "unknown", "message": "status.json is missing or unreadable"}
    if _is_orphaned(status):
        status = update_status(
            run_dir,
            lambda s: (
                {"state": "crashed", "message": CRASHED_MESSAGE, "finished_at": time.time()}
                if _is_orphaned(s)
                else None
            ),
        )
    return status


def update_status(run_dir: str | os.PathLike, change) -> dict[str, Any]:
    """Applies change(status) -> dict of fields (or None for no change) atomically; returns
    the status after it."""
    run_dir = Path(run_dir)
    with _status_lock(run_dir):
        status = _read_status_file(run_dir)
        fields = change(dict(status))
        if fields:
            status.update(fields)
            status["updated_at"] = time.time()
            write_json_atomic(run_dir / "status.json", status)
    return status


def write_status(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merges fields into status.json (atomically, updated_at set); returns the new status."""
    return update_status(run_dir, lambda _s: fields)


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Returns summary.json, or None before the run reached a final state."""
    data = read_json(Path(run_dir) / "summary.json")
    return data if isinstance(data, dict) else None


def write_summary(run_dir: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Writes summary.json atomically, with every contract key present (null when unknown)."""
    full = {key: None for key in SUMMARY_KEYS}
    full["skipped_files"] = []
    full.update(summary)
    write_json_atomic(Path(run_dir) / "summary.json", full)


# ---------------------------------------------------------------------------------------------
# Metrics


def _parse_metric_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line: the writer died mid-write
        if isinstance(record, dict) and "split" in record and "step" in record:
            records.append(record)
    return records


def clean_metric_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Returns records as a resumed run sees them: the last record per (split, step).

    A resume starts again from the checkpoint's step, so a record whose step is not past
    the last one of its split marks a restart: the records of the dead attempt from that
    step on (of every split) are dropped, and the new ones kept.
    """
    kept: list[dict[str, Any]] = []
    last_step: dict[str, int] = {}
    for record in records:
        try:
            step = int(record["step"])
        except (TypeError, ValueError):
            continue
        split = record["split"]
        if split in last_step and step <= last_step[split]:
            kept = [r for r in kept if int(r["step"]) < step]
            last_step = {}
            for r in kept:
                last_step[r["split"]] = int(r["step"])
        kept.append(record)
        last_step[split] = step
    return kept


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Returns metrics.jsonl as a DataFrame, one row per record in file order.

    Columns: split, epoch, step (nullable ints), loss, acc, acc5, lr, time_s, images_per_s
    (floats, NaN where null), phase (val rows), and any extra keys. Empty with these
    columns when there is no file yet.
    """
    try:
        text = (Path(run_dir) / "metrics.jsonl").read_text(errors="replace")
    except OSError:
        text = ""
    records = clean_metric_records(_parse_metric_lines(text))
    frame = pd.DataFrame.from_records(records)
    for column in METRIC_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    for column, dtype in METRIC_COLUMNS.items():
        if dtype == "string":
            frame[column] = frame[column].astype("string")
        elif dtype == "Int64":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
        else:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    extra = [c for c in frame.columns if c not in METRIC_COLUMNS]
    return frame[list(METRIC_COLUMNS) + extra].reset_index(drop=True)


class _Callback:
    """Duck-typed engine callback: every on_* hook the engine calls is a no-op unless defined."""

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class MetricsWriter(_Callback):
    """Engine callback that appends every train/val/test record to metrics.jsonl, flushed.

    On a resumed fit, records of the dead attempt past the checkpoint's step are dropped
    first (an atomic rewrite), so the file reads cleanly even without the reader's dedupe.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None

    def _open(self) -> None:
        if self._file is None:
            self._file = open(self.path, "a")

    def on_fit_start(self, trainer) -> None:
        step = int(getattr(trainer, "step", 0) or 0)
        if self.path.exists():
            text = self.path.read_text(errors="replace")
            records = clean_metric_records(_parse_metric_lines(text))
            kept = [r for r in records if int(r["step"]) <= step]
            if len(kept) != len(records) or (text and not text.endswith("\n")):
                _write_lines_atomic(self.path, kept)
        self._open()

    def write(self, record: dict[str, Any]) -> None:
        self._open()
        self._file.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
        self._file.flush()

    def on_train_record(self, trainer, record) -> None:
        self.write(record)

    def on_epoch_end(self, trainer, record) -> None:
        if record:
            self.write(record)

    def on_test_record(self, trainer, record) -> None:
        self.write(record)

    def on_record(self, trainer, record) -> None:
        self.write(record)

    def on_fit_end(self, trainer, summary) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_lines_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        for record in records:
            f.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Listing and finding runs


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (path / "status.json").is_file()


def _run_dirs(root: Path) -> list[Path]:
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    return [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]


def disk_bytes(path: str | os.PathLike) -> int:
    """Returns the total size of the files below path."""
    total = 0
    stack = [os.fspath(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def _best_val_from_metrics(run_dir: Path) -> float | None:
    frame = read_metrics(run_dir)
    val = frame.loc[frame["split"] == "val", "acc"].dropna()
    return float(val.max()) if len(val) else None


def list_runs(runs_dir: str | os.PathLike) -> pd.DataFrame:
    """Returns one row per run, newest first; folders that are not runs are skipped.

    Columns: run_id, name, model, strategy, state, best_val_acc (0-1, NaN when unknown),
    trainable_pct (0-100), train_time_s, disk_bytes, group, created_at (local datetime),
    path (absolute). Reading a live run's status marks it crashed when its worker is gone.
    """
    rows = []
    for run_dir in _run_dirs(Path(runs_dir)):
        config = read_json(run_dir / "config.json")
        if not isinstance(config, dict) or not (run_dir / "status.json").is_file():
            continue
        status = read_status(run_dir)
        summary = read_summary(run_dir) or {}
        best = summary.get("best_val_acc")
        if best is None and status.get("state") in LIVE_STATES:
            best = _best_val_from_metrics(run_dir)
        trainable = summary.get("trainable_params", status.get("trainable_params"))
        total = summary.get("total_params", status.get("total_params"))
        pct = 100.0 * trainable / total if trainable is not None and total else None
        created = status.get("created_at")
        if not isinstance(created, (int, float)):
            try:
                created = (run_dir / "config.json").stat().st_mtime
            except OSError:
                created = 0.0
        rows.append(
            {
                "run_id": run_dir.name,
                "name": config.get("name") or "",
                "model": config.get("model"),
                "strategy": strategy_label(config),  # with its option: "last_n 1"
                "state": status.get("state", "unknown"),
                "best_val_acc": best,
                "trainable_pct": pct,
                "train_time_s": summary.get("train_time_s"),
                "disk_bytes": disk_bytes(run_dir),
                "group": config.get("group"),
                "created_at": float(created),
                "path": str(run_dir.resolve()),
            }
        )
    frame = pd.DataFrame(rows, columns=LIST_COLUMNS)
    frame = frame.sort_values(["created_at", "run_id"], ascending=False, kind="stable")
    frame["created_at"] = pd.Series(
        [datetime.fromtimestamp(t) for t in frame["created_at"]],
        index=frame.index,
        dtype="datetime64[ns]",
    )
    for column in ("best_val_acc", "trainable_pct", "train_time_s"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    frame["disk_bytes"] = frame["disk_bytes"].astype("int64")
    return frame.reset_index(drop=True)


def resolve_run(ref: str | os.PathLike, runs_dir: str | os.PathLike | None = None) -> Path:
    """Returns the absolute run folder for a run id, a unique id prefix, or a path.

    Raises RunError naming the candidates when the reference is ambiguous or matches
    nothing.
    """
    ref_text = os.fspath(ref).strip()
    if not ref_text:
        raise RunError("no run given; pass a run id, a unique id prefix, or a run folder")
    path = Path(ref_text).expanduser()
    if _is_run_dir(path):
        return path.resolve()
    root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    ids = sorted((p.name for p in _run_dirs(root) if _is_run_dir(p)), reverse=True)
    if ref_text in ids:
        return (root / ref_text).resolve()
    matches = [i for i in ids if i.startswith(ref_text)]
    if len(matches) == 1:
        return (root / matches[0]).resolve()
    if matches:
        shown = ", ".join(matches[:10]) + (" ..." if len(matches) > 10 else "")
        raise RunError(
            f"run {ref_text!r} is ambiguous: it matches {len(matches)} runs ({shown}); "
            "give more characters of the id"
        )
    if ("/" in ref_text or path.exists()) and not path.is_dir():
        raise RunError(f"{ref_text} is not a run folder (it does not exist)")
    if path.is_dir():
        raise RunError(f"{ref_text} is not a run folder (no config.json and status.json in it)")
    if not ids:
        raise RunError(f"no run {ref_text!r}: there are no runs in {root}")
    shown = ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")
    raise RunError(
        f"no run {ref_text!r} in {root}; the newest runs are {shown} "
        "(see `python -m finetune_core list`)"
    )


def rename_run(run_dir: str | os.PathLike, name: str) -> None:
    """Sets the run's label (config "name"); the run id does not change."""
    run_dir = Path(run_dir)
    name = str(name).strip()
    if len(name) > 100:
        raise RunError("a run name must be at most 100 characters")
    config = read_config(run_dir)
    config["name"] = name
    write_json_atomic(run_dir / "config.json", config)


def delete_run(run_dir: str | os.PathLike) -> None:
    """Deletes a run folder; refuses a queued or running run (stop or cancel it first)."""
    run_dir = Path(run_dir)
    if not _is_run_dir(run_dir):
        raise RunError(f"{run_dir} is not a run folder; nothing deleted")
    state = read_status(run_dir).get("state")
    if state in LIVE_STATES:
        action = "cancel" if state == "queued" else "stop"
        raise RunError(f"run {run_dir.name} is {state}; {action} it before deleting it")
    shutil.rmtree(run_dir)


def read_log_tail(run_dir: str | os.PathLike, lines: int = 50) -> str:
    """Returns the last `lines` lines of worker.log ("" when there is none)."""
    path = Path(run_dir) / "worker.log"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            chunk = 64 * 1024
            data = b""
            while size > 0 and data.count(b"\n") <= lines:
                read = min(chunk, size)
                size -= read
                f.seek(size)
                data = f.read(read) + data
    except OSError:
        return ""
    text = data.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


COMPARE_COLUMNS = [
    "run_id",
    "name",
    "model",
    "strategy",
    "state",
    "best_val_acc",
    "final_val_acc",
    "test_acc",
    "trainable_params",
    "total_params",
    "trainable_pct",
    "train_time_s",
    "images_per_s",
    "epochs_run",
    "group",
    "path",
]


def compare_runs(run_dirs) -> pd.DataFrame:
    """Returns one row of final metrics per run, in the order given.

    Columns: run_id, name, model, strategy, state, best_val_acc, final_val_acc, test_acc
    (0-1), trainable_params, total_params, trainable_pct (0-100), train_time_s,
    images_per_s (median over train records), epochs_run, group, path. Values of a run
    without summary.json yet are NaN.
    """
    rows = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        conf = read_json(run_dir / "config.json") or {}
        status = read_status(run_dir)
        summary = read_summary(run_dir) or {}
        metrics = read_metrics(run_dir)
        speed = metrics.loc[metrics["split"] == "train", "images_per_s"].dropna()
        trainable = summary.get("trainable_params", status.get("trainable_params"))
        total = summary.get("total_params", status.get("total_params"))
        best = summary.get("best_val_acc")
        if best is None:
            best = _best_val_from_metrics(run_dir)
        rows.append(
            {
                "run_id": run_dir.name,
                "name": conf.get("name") or "",
                "model": conf.get("model"),
                "strategy": conf.get("strategy"),
                "state": status.get("state"),
                "best_val_acc": best,
                "final_val_acc": summary.get("final_val_acc"),
                "test_acc": summary.get("test_acc"),
                "trainable_params": trainable,
                "total_params": total,
                "trainable_pct": 100.0 * trainable / total
                if trainable is not None and total
                else None,
                "train_time_s": summary.get("train_time_s"),
                "images_per_s": float(speed.median()) if len(speed) else None,
                "epochs_run": summary.get("epochs_run"),
                "group": conf.get("group"),
                "path": str(run_dir.resolve()),
            }
        )
    frame = pd.DataFrame(rows, columns=COMPARE_COLUMNS)
    for column in (
        "best_val_acc",
        "final_val_acc",
        "test_acc",
        "trainable_pct",
        "train_time_s",
        "images_per_s",
    ):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in ("trainable_params", "total_params", "epochs_run"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    return frame
