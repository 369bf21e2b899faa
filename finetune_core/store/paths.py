"""Where runs live, their ids, and finding a run from an id, a unique id prefix or a path."""

from __future__ import annotations

import os
import re
import secrets
import time
from datetime import datetime
from pathlib import Path

from finetune_core.store.schema import RunError


def runs_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Returns the absolute runs folder: explicit, else $FINETUNE_RUNS_DIR, else ./runs."""
    path = explicit or os.environ.get("FINETUNE_RUNS_DIR") or "runs"
    return Path(path).expanduser().resolve()


def new_run_id(now: float | None = None) -> str:
    """Returns a fresh run id: YYYYMMDD-HHMMSS-xxxxxx (local time, 6 random hex digits)."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now)
    return f"{stamp:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def new_group_id() -> str:
    """Returns an id shared by runs launched together (same format as a run id)."""
    return new_run_id()


def is_run_dir(path: Path) -> bool:
    """Returns True for a folder with a run's config.json and status.json."""
    return path.is_dir() and (path / "config.json").is_file() and (path / "status.json").is_file()


def run_dirs(root: Path) -> list[Path]:
    """Returns the candidate run folders below root (not hidden; unsorted)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    return [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]


def _by_id(text: str, root: Path) -> tuple[Path | None, list[str]]:
    """Returns (the run folder in root whose id is text or starts with it, or None; the ids
    of root's runs, newest first); RunError when text starts several ids."""
    ids = sorted((p.name for p in run_dirs(root) if is_run_dir(p)), reverse=True)
    matches = [text] if text in ids else [i for i in ids if i.startswith(text)]
    if len(matches) > 1:
        shown = ", ".join(matches[:10]) + (" ..." if len(matches) > 10 else "")
        raise RunError(
            f"run {text!r} is ambiguous: it matches {len(matches)} runs ({shown}); "
            "give more characters of the id"
        )
    return ((root / matches[0]).resolve() if matches else None), ids


def resolve_run(ref: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Returns the absolute run folder for a run id, a unique id prefix, or a path.

    Raises RunError naming the candidates when the reference is ambiguous or matches
    nothing.
    """
    ref_text = os.fspath(ref).strip()
    if not ref_text:
        raise RunError("no run given; pass a run id, a unique id prefix, or a run folder")
    path = Path(ref_text).expanduser()
    if is_run_dir(path):
        return path.resolve()
    root = Path(root) if root is not None else runs_dir()
    found, ids = _by_id(ref_text, root)
    if found is not None:
        return found
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


# what a page link may name: a run id or the start of one (digits, dashes, lowercase hex)
_ID_PREFIX = re.compile(r"[0-9a-f-]{1,22}")


def resolve_run_id(ref: str, root: str | os.PathLike) -> Path:
    """Returns the run folder in root named by a run id or a unique id prefix.

    For page references (Training's ?run=, New run's ?clone=): a link names a run of this
    runs folder, never a path, so a link cannot reach another folder's runs (or weights).
    The CLI's resolve_run keeps accepting paths. Raises RunError saying what was wrong;
    the message never shows the server's runs folder.
    """
    text = str(ref).strip()
    if not text:
        raise RunError("no run given; a link names a run by its id (YYYYMMDD-HHMMSS-xxxxxx)")
    where = "in this dashboard's runs folder"
    if not _ID_PREFIX.fullmatch(text):
        raise RunError(
            f"no run {text!r} {where}: a link names a run by its id (YYYYMMDD-HHMMSS-xxxxxx), "
            "never a path"
        )
    found, _ = _by_id(text, Path(root))
    if found is None:
        raise RunError(f"no run {text!r} {where}")
    return found
