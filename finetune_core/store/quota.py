"""Each user's limits on a shared server: runs queued at once, and the disk their runs and
uploads take (FINETUNE_USER_MAX_QUEUED, FINETUNE_USER_DISK_GB: store/access.py). Checked
before anything is written, so a launch or an upload over a limit leaves nothing behind.
The local mode (no user) has no limits."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from finetune_core.store import access
from finetune_core.store.paths import is_run_dir, run_dirs
from finetune_core.store.runs import disk_bytes, read_config
from finetune_core.store.status import read_status
from finetune_core.util.locks import FileLock

LAUNCH_LOCK = ".launch.lock"  # held while a launch checks the limits and creates its runs


def launch_lock(runs_dir: str | os.PathLike) -> FileLock:
    """Returns the lock that makes checking a user's limits and creating runs one step (two
    tabs of one user launching at once cannot both pass the check)."""
    return FileLock(Path(runs_dir) / LAUNCH_LOCK)


def _owned(runs_dir: Path, user: str) -> list[Path]:
    found = []
    for run_dir in run_dirs(runs_dir):
        try:
            if is_run_dir(run_dir) and access.owner_of(read_config(run_dir)) == user:
                found.append(run_dir)
        except (OSError, ValueError):
            continue  # an unreadable run is nobody's here
    return found


def queued_runs(runs_dir: str | os.PathLike, user: str) -> int:
    """Returns how many of the user's runs are queued now."""
    return sum(
        read_status(d).get("state") == "queued" for d in _owned(Path(runs_dir), user_key(user))
    )


def disk_used(runs_dir: str | os.PathLike, user: str) -> int:
    """Returns the bytes the user's run folders and their own folder (uploads) take."""
    root = Path(runs_dir)
    key = user_key(user)
    return sum(disk_bytes(d) for d in _owned(root, key)) + disk_bytes(access.user_home(root, key))


def user_key(user: str) -> str:
    key = access.user_key(user)
    if key is None:
        raise ValueError("a quota is counted for a user; got none")
    return key


def _gb(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n} bytes"


def check_launch(
    runs_dir: str | os.PathLike, actor: str | None, runs: int, specs: Iterable[str] = ()
) -> None:
    """Raises NotAllowed when `runs` more queued runs would take the user past their limit
    of queued runs, when their disk is already full, or when a data or weights path of the
    launch (specs) is another user's upload. Nothing is checked in the local mode."""
    access.refuse_in_demo("launch runs")
    if actor is None:
        return
    for spec in specs:
        problem = access.foreign_upload(str(spec), runs_dir, actor)
        if problem:
            raise access.NotAllowed(problem)
    limit = access.max_queued()
    if limit:
        queued = queued_runs(runs_dir, actor)
        if queued + runs > limit:
            raise access.NotAllowed(
                f"you have {queued} run(s) queued and this launch adds {runs}, "
                f"over the limit of {limit} queued runs per user (FINETUNE_USER_MAX_QUEUED); "
                "wait for some to start, or cancel some"
            )
    check_disk(runs_dir, actor, 0)


def check_disk(runs_dir: str | os.PathLike, actor: str | None, adding: int, what: str = "") -> None:
    """Raises NotAllowed when the user's runs and uploads, plus `adding` bytes, would take
    more than their disk limit (`what`: the refusal's first words, "x.zip not kept")."""
    limit = access.disk_limit_bytes()
    if actor is None or not limit:
        return
    used = disk_used(runs_dir, actor)
    if used + adding > limit or (adding == 0 and used >= limit):
        extra = f" and this needs {_gb(adding)} more" if adding else ""
        raise access.NotAllowed(
            (f"{what}: " if what else "")
            + f"your runs and uploads take {_gb(used)}{extra}, over your limit of "
            f"{_gb(limit)} (FINETUNE_USER_DISK_GB); delete runs you no longer need on Home"
        )
