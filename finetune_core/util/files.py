"""Atomic file writes (temp file in the same folder + os.replace) and tolerant JSON reading.

Readers of a file written here see the old or the new content, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, fsync: bool = False):
    """Calls write(temp path) and moves the result onto path atomically; returns write's result.

    write creates the temp file, which lives beside path (same file system, so os.replace
    is atomic) under a name no other writer uses, and is removed when write or the replace
    fails, leaving the old file as it was. fsync=True
    flushes the data to disk before the replace, so a power loss never leaves an empty file,
    and the folder after it, so the replace itself survives one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        result = write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_folder(path.parent)
    return result


def fsync_folder(path: str | os.PathLike) -> None:
    """Flushes a folder's entries (files created, renamed or removed in it) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows cannot open a folder; its renames are flushed with the file
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """Writes text to path atomically, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text), fsync=fsync)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Writes data as JSON (NaN/inf as null) so that readers see the old or the new file."""
    text = json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text), fsync=True)


def write_lines_atomic(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Replaces path with one JSON object per line (a JSON Lines file), atomically."""
    text = "".join(json_line(r) for r in records)
    atomic_write(path, lambda tmp: tmp.write_text(text), fsync=True)


def json_line(record: dict[str, Any]) -> str:
    """Returns record as one JSON line with its newline (NaN/inf as null)."""
    return json.dumps(jsonable(record), allow_nan=False) + "\n"


def jsonable(value: Any) -> Any:
    """Returns value with NaN/inf turned into null and numpy/torch scalars into Python ones."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy arrays/scalars, torch tensors
        return jsonable(value.tolist())
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)


def read_json(path: str | os.PathLike) -> Any:
    """Returns the parsed JSON file, or None when it is missing or not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
