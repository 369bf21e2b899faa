"""Uploads: the files a page received, kept under an id of their content so that no upload
ever replaces another, pinned by the run configs that name them, and deleted once nothing
uses them; and the background job that extracts an uploaded zip. No torch, no streamlit.

    <runs>/.uploads/<id>/<file name>    id = the first 32 hex digits of the file's sha256
    <runs>/.users/<user>/.uploads/<id>/<file name>    a signed-in user's own (store.access)

The same bytes get the same folder (a file uploaded twice is stored once; the same bytes
under a second name are a second, identical file in it); other bytes get another folder, so
a run queued with one user's upload trains on exactly that file whatever is uploaded later.
A file is written to a temporary name, flushed, made read-only and then moved into place.

Uploads live in the runs folder because what keeps them lives there too: a run's config
names the file (its `data` or `weights`), and so may the saved New run form. `clean` deletes
an upload folder that no run config, no job and no kept value names and that was not used
for KEEP_DAYS; New run calls it at most once an hour (`clean_now_and_then`), since the page
is where uploads come from and a server nobody uses grows no uploads.

On a server with sign-in each user has an uploads folder of their own (`user=`): nobody
else's form names their files, a launch naming another user's upload is refused
(store.quota.check_launch), and an upload that would take the user past their disk limit is
refused before a byte is written. A read-only demo keeps no uploads.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from finetune_core import store
from finetune_core.util.files import atomic_write
from finetune_core.util.locks import FileLock

UPLOADS_DIR = ".uploads"
ID_DIGITS = 32  # of the sha256: 128 bits, no two different files share an id
KEEP_DAYS = 7.0  # an upload nothing names is deleted this long after it was last used
CLEAN_EVERY_S = 3600.0  # New run cleans at most this often
_LOCK = ".lock"
_CLEANED = ".cleaned"  # its mtime: when clean last ran
_ID = re.compile(rf"[0-9a-f]{{{ID_DIGITS}}}")


def uploads_dir(runs_dir: str | os.PathLike, user: str | None = None) -> Path:
    """Returns the folder holding the uploads of a runs folder, or of one of its users."""
    return store.access.user_home(runs_dir, user) / UPLOADS_DIR


def safe_name(name: str) -> str:
    """Returns a file name that is safe on any file system (letters, digits, . _ -)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name)).name).lstrip(".")
    return cleaned[:120] or "upload"


def upload_id(content: bytes | memoryview) -> str:
    """Returns the id an upload of these bytes is kept under."""
    return hashlib.sha256(content).hexdigest()[:ID_DIGITS]


def save(
    runs_dir: str | os.PathLike,
    name: str,
    content: bytes | memoryview,
    *,
    user: str | None = None,
) -> Path:
    """Returns the path of the kept upload of these bytes under this name, writing it when
    it is not kept yet; the file is read-only and never rewritten. With `user`, in that
    user's own folder; store.access.NotAllowed (nothing written) in a read-only demo or past
    the user's disk limit."""
    store.access.refuse_in_demo("keep uploads")
    folder = uploads_dir(runs_dir, user)
    target = folder / upload_id(content) / safe_name(name)
    with FileLock(folder / _LOCK):  # clean never deletes a folder while it is filled
        kept = target.is_file() and target.stat().st_size == len(content)
        if not kept:
            store.quota.check_disk(runs_dir, user, len(content), f"{safe_name(name)} not kept")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not kept:

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:
                    f.write(content)
                os.chmod(tmp, 0o444)

            atomic_write(target, write, fsync=True)
        touch(target)
    return target


def upload_folder(
    path: str | os.PathLike, runs_dir: str | os.PathLike, user: str | None = None
) -> Path | None:
    """Returns the upload folder a path lies in (an upload of this runs folder, or of that
    user), or None."""
    base = uploads_dir(runs_dir, user).resolve()
    try:
        rel = Path(path).resolve().relative_to(base)
    except (ValueError, OSError):
        return None
    return base / rel.parts[0] if rel.parts and _ID.fullmatch(rel.parts[0]) else None


def touch(path: str | os.PathLike) -> None:
    """Marks the upload holding path as used now (clean keeps it KEEP_DAYS from now)."""
    folder = Path(path).parent if Path(path).is_file() else Path(path)
    try:
        os.utime(folder)
    except OSError:
        pass  # gone: whoever uses it next is told it does not exist


def _references(runs_dir: Path) -> str:
    """Returns the text of every run config and job of the runs folder (an upload is named
    there when its id is in it; unreadable JSON still counts, as its raw text)."""
    files = [d / "config.json" for d in store.run_dirs(runs_dir)]
    files += list((runs_dir / ".jobs").glob("*/job.json"))
    parts = []
    for path in files:
        try:
            parts.append(path.read_bytes().decode("utf-8", "replace"))
        except OSError:
            continue
    return "\n".join(parts)


def clean(
    runs_dir: str | os.PathLike,
    *,
    keep: Iterable[str] = (),
    keep_days: float = KEEP_DAYS,
    now: float | None = None,
    user: str | None = None,
) -> list[Path]:
    """Deletes the uploads (of `user`, with one) that no run config, no job and no value of
    `keep` (the form's saved values) names and that were not used for keep_days; returns
    the folders deleted.

    An upload a run names (queued, running, finished: any run with a config) is never
    deleted, whatever its age.
    """
    runs_dir = Path(runs_dir)
    folder = uploads_dir(runs_dir, user)
    if not folder.is_dir():
        return []
    now = time.time() if now is None else now
    deleted = []
    with FileLock(folder / _LOCK):
        named = _references(runs_dir) + "\n" + "\n".join(str(k) for k in keep)
        for entry in sorted(folder.iterdir()):
            if not (entry.is_dir() and _ID.fullmatch(entry.name)) or entry.name in named:
                continue
            try:
                if now - entry.stat().st_mtime < keep_days * 86400:
                    continue
            except OSError:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            deleted.append(entry)
        stamp = folder / _CLEANED
        stamp.touch()
        os.utime(stamp, (now, now))
    return deleted


def clean_now_and_then(
    runs_dir: str | os.PathLike,
    *,
    keep: Iterable[str] = (),
    every_s: float = CLEAN_EVERY_S,
    now: float | None = None,
    user: str | None = None,
) -> list[Path] | None:
    """Calls clean when it did not run for every_s; returns what it deleted, or None when
    it was not its time."""
    now = time.time() if now is None else now
    try:
        last = (uploads_dir(runs_dir, user) / _CLEANED).stat().st_mtime
    except OSError:
        last = None
    if last is not None and now - last < every_s:
        return None
    return clean(runs_dir, keep=keep, now=now, user=user)


def extract_args(path: str | os.PathLike) -> dict[str, str]:
    """Returns what an extraction job of this zip is asked (its identity: the same zip
    finds the same job)."""
    path = Path(path)
    return {"path": str(path), "label": path.name}


def extract_job(args: dict[str, Any], progress: Callable) -> dict[str, str]:
    """The "extract" job kind: extracts the zip (data.zips, once per content) in the job's
    process, never the web server's; returns {"folder": where it was extracted}."""
    from finetune_core.data.zips import extract_zip  # torch: only in the job's process

    progress(0.0, f"unpacking {args['label']}")
    wants_progress = "progress" in inspect.signature(extract_zip).parameters
    kwargs = {"progress": progress} if wants_progress else {}
    return {"folder": str(extract_zip(Path(args["path"]), args["label"], **kwargs))}


def extracted(status: dict[str, Any]) -> bool:
    """Returns True when a completed extraction job's folder is still there."""
    result = status.get("result") if status.get("state") == "completed" else None
    folder = result.get("folder") if isinstance(result, dict) else None
    return bool(folder) and Path(folder).is_dir()
