"""Atomic file writes (temp file in the same folder + os.replace), tolerant JSON reading, and
telling a full disk apart from other write failures.

Readers of a file written here see the old or the new content, never a half-written one. A
write that fails here carries the file it was writing and whether the disk was full then
(see `failed_write`), so a message can say what to free and where.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
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
    except BaseException as error:
        note_failed_write(error, path)  # before the temp file goes: its space is the evidence
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
    except (OSError, ValueError, RecursionError):
        return None


# ---------------------------------------------------------------------------------------------
# A full disk

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A write that failed with less than this left on its file system failed for want of space:
# torch.save says only "unexpected pos" or "file write failed", without an errno.
LOW_SPACE_BYTES = 1 << 20
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Returns the bytes free for this user on path's file system (None where unknown)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def note_failed_write(error: BaseException, path: str | os.PathLike) -> None:
    """Marks error (raised while writing path) with the path and whether the disk was full;
    the innermost write's mark wins. Python exceptions only: Ctrl-C is no failed write."""
    if not isinstance(error, Exception) or getattr(error, "failed_write", None):
        return
    free = free_bytes(Path(path).parent)
    full = _says_disk_full(error) or (free is not None and free < LOW_SPACE_BYTES)
    with contextlib.suppress(AttributeError, TypeError):
        error.failed_write = os.fspath(path)
        error.disk_full = full
        error.add_note(f"while writing {os.fspath(path)}" + (" (the disk is full)" if full else ""))


def _says_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error)
    return any(t in text for t in _DISK_FULL_TEXTS)


def failed_write(error: BaseException) -> tuple[bool, str | None]:
    """Returns (whether error, or one it came from, is a full disk; the file it was writing,
    None where unknown)."""
    full, path, seen = False, None, set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        path = path or getattr(e, "failed_write", None)
        if path is None and isinstance(e, OSError) and isinstance(e.filename, str):
            path = e.filename
        full = full or bool(getattr(e, "disk_full", False)) or _says_disk_full(e)
        e = e.__cause__ or e.__context__
    return full, path


def mount_point(path: str | os.PathLike) -> str:
    """Returns the mount point of the file system that holds path (or its nearest folder)."""
    p = Path(os.path.abspath(os.fspath(path)))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def disk_full_message(what: str, near: str | os.PathLike, then: str = "resume the run") -> str:
    """Returns "the disk is full (No space left on device) while writing WHAT: free space on
    MOUNT and THEN", MOUNT being the file system that holds `near`."""
    return (
        f"the disk is full ({os.strerror(errno.ENOSPC)}) while writing {what}: free space on "
        f"{mount_point(near)} and {then}"
    )


def write_json_in_place(path: str | os.PathLike, data: Any) -> None:
    """Rewrites a JSON file within the disk space it already holds: the last resort when the
    disk is full and no temp file fits. Not atomic (a reader may see a torn file for a
    moment), so only for a final word that would otherwise be lost. Raises OSError (ENOSPC)
    when the new content needs more space than the file holds."""
    text = (json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n").encode()
    held = os.stat(path).st_blocks * 512
    if len(text) > held:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
    with open(path, "r+b") as f:
        f.write(text)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
