"""metrics.jsonl: the records a run appends (train every few steps, val each epoch, test at
the end), written flushed as they come, and read back tolerantly: a torn last line is
skipped and, after a resume, the records of the dead attempt are dropped.

A page that watches a live run reads its metrics every second or two: `read_metrics`
remembers each file it read (per process) and then parses only the lines appended since.
The file also holds a drift record after each epoch (schema.DRIFT_SPLIT): `read_metrics`
leaves those out, so every metric chart reads as before, and `read_drift` reads them.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pandas as pd

from finetune_core.callbacks import Callback
from finetune_core.store.schema import (
    DRIFT_COLUMNS,
    DRIFT_SPLIT,
    METRIC_COLUMNS,
    SCHEMA_VERSION,
    upgrade,
)
from finetune_core.util.files import json_line, write_lines_atomic


def _parse_metric_lines(text: str, path: Path) -> list[dict[str, Any]]:
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
            records.append(upgrade(record, f"a record of {path}"))
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


def signature(run_dir: str | os.PathLike) -> tuple[int, int, int] | None:
    """Returns what changes when metrics.jsonl changes (inode, size, mtime), None without one."""
    try:
        st = os.stat(Path(run_dir) / "metrics.jsonl")
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class _Read:
    """What was read of one file: up to which byte, the records parsed, the frame of them
    (and, once asked for, the frame of its drift records)."""

    def __init__(self, sig, offset: int, records: list, frame: pd.DataFrame, cleaned: list):
        self.sig, self.offset, self.records, self.frame = sig, offset, records, frame
        self.cleaned = cleaned
        self.drift: pd.DataFrame | None = None


_READS: OrderedDict[Path, _Read] = OrderedDict()  # most recently read last
_READS_MAX = 256
_LOCK = threading.Lock()  # a Streamlit server reads from one thread per session


def _read_new_lines(path: Path, offset: int) -> tuple[str, int]:
    """Returns the complete lines after byte `offset` and the offset after the last of them."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a torn last line waits for its end
    return data[:end].decode(errors="replace"), offset + end


def read_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Returns the run's metrics records, cleaned (see clean_metric_records)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    return clean_metric_records(_parse_metric_lines(text, path))


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Returns metrics.jsonl as a DataFrame, one row per record in file order (drift records
    left out: see read_drift).

    Columns: split, epoch, step (nullable ints), loss, acc, acc5, lr, time_s, images_per_s
    (floats, NaN where null), phase (val rows), and any extra keys. Empty with these
    columns when there is no file yet. A file read before is only read from where the last
    read stopped, unless it was replaced or shrank (a resume trims it).
    """
    seen = _read(run_dir)
    return metrics_frame([]) if seen is None else seen.frame.copy()


def read_drift(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Returns the run's drift records as a DataFrame with schema.DRIFT_COLUMNS: one row per
    (epoch, group), epochs in order and each epoch's groups stem first, the head last.
    Empty with these columns before the first epoch ends (and for runs from before drift
    was recorded)."""
    seen = _read(run_dir)
    if seen is None:
        return drift_frame([])
    if seen.drift is None:
        seen.drift = drift_frame(seen.cleaned)
    return seen.drift.copy()


def _read(run_dir: str | os.PathLike) -> _Read | None:
    """Returns what metrics.jsonl holds now (parsing only what was appended since the last
    read of this process), or None when there is no file or it cannot be read."""
    path = Path(run_dir).resolve() / "metrics.jsonl"
    sig = signature(path.parent)
    if sig is None:
        return None
    with _LOCK:
        seen = _READS.get(path)
        if seen is not None and seen.sig == sig:
            _READS.move_to_end(path)
            return seen
        grows = seen is not None and seen.sig[0] == sig[0] and sig[1] >= seen.offset
        offset, records = (seen.offset, list(seen.records)) if grows else (0, [])
    try:
        text, offset = _read_new_lines(path, offset)
    except OSError:
        return None
    records += _parse_metric_lines(text, path)
    cleaned = clean_metric_records(records)
    seen = _Read(sig, offset, records, metrics_frame(cleaned), cleaned)
    with _LOCK:
        _READS[path] = seen
        _READS.move_to_end(path)
        while len(_READS) > _READS_MAX:
            _READS.popitem(last=False)
    return seen


def metrics_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Returns records as read_metrics types them (the file's "schema" key and drift records
    left out)."""
    records = [
        {k: v for k, v in r.items() if k != "schema"}
        for r in records
        if r.get("split") != DRIFT_SPLIT
    ]
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


def drift_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Returns the drift records among `records` as read_drift types them."""
    rows = []
    for r in records:
        if r.get("split") != DRIFT_SPLIT or not isinstance(r.get("drift"), dict):
            continue
        norms = r.get("start_norm") if isinstance(r.get("start_norm"), dict) else {}
        for group, value in r["drift"].items():
            rows.append(
                {
                    "epoch": r.get("epoch"),
                    "step": r.get("step"),
                    "time_s": r.get("time_s"),
                    "phase": r.get("phase"),
                    "group": group,
                    "drift": value,
                    "start_norm": norms.get(group),
                }
            )
    frame = pd.DataFrame(rows, columns=list(DRIFT_COLUMNS))
    for column, dtype in DRIFT_COLUMNS.items():
        if dtype == "string":
            frame[column] = frame[column].astype("string")
        elif dtype == "Int64":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
        else:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


class MetricsWriter(Callback):
    """Engine callback that appends every train/val/test record to metrics.jsonl, flushed
    (`write` appends any other record, such as an epoch's drift).

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
            records = clean_metric_records(_parse_metric_lines(text, self.path))
            kept = [r for r in records if int(r["step"]) <= step]
            if len(kept) != len(records) or (text and not text.endswith("\n")):
                write_lines_atomic(self.path, kept)
        self._open()

    def write(self, record: dict[str, Any]) -> None:
        self._open()
        self._file.write(json_line({**record, "schema": SCHEMA_VERSION}))
        self._file.flush()

    def on_train_record(self, trainer, record) -> None:
        self.write(record)

    def on_eval_record(self, trainer, record) -> None:
        self.write(record)

    def on_fit_end(self, trainer, summary) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
