"""A run folder's life: created with its config and status, its summary written at a final
state, renamed, deleted; and reading its files back."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Any

from finetune_core.config import RunConfig, stored_config
from finetune_core.store import access
from finetune_core.store.paths import is_run_dir, new_run_id
from finetune_core.store.schema import (
    ACTIVE_STATES,
    LIVE_STATES,
    SUMMARY_KEYS,
    RunError,
    stamped,
    upgrade,
)
from finetune_core.store.status import new_status, read_status
from finetune_core.util.files import disk_full_message, failed_write, read_json, write_json_atomic


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
    env: dict[str, str] | None = None,
    owner: str | None = None,
) -> Path:
    """Returns the new run folder with config.json and status.json ("queued").

    Relative data and weights paths are made absolute, so a worker started from another
    folder finds them. With owner_pid (the CLI running it in the foreground), the run
    starts as "running", owned by that process, so no supervisor picks it up. `env` is
    recorded in config.json (default: this machine's versions and device, which imports
    torch: reading runs never does), and so is `owner`, the user the run belongs to
    (store/access.py; none in the local mode). A read-only demo creates nothing.
    """
    access.refuse_in_demo("launch runs")
    if env is None:
        from finetune_core import device  # torch: only where runs are created

        env = device.environment(cfg.device)
    root = Path(runs_dir).resolve()
    conf = cfg.to_dict()
    conf["data"] = _absolute_local_path(cfg.data, ("builtin:", "torchvision:"))
    conf["weights"] = _absolute_local_path(cfg.weights, ("default", "none", "builtin", "run:"))
    conf["group"] = group if group is not None else cfg.group
    conf["env"] = env
    if access.user_key(owner) is not None:
        conf["owner"] = access.user_key(owner)
    run_dir = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            run_dir = root / new_run_id()
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
        write_json_atomic(run_dir / "config.json", stamped(conf))
        write_json_atomic(run_dir / "status.json", new_status(owner_pid))
    except OSError as error:
        if run_dir is not None and run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # no half-made run folder left behind
        if not failed_write(error)[0]:
            raise
        raise RunError(
            "no run was created: " + disk_full_message("a new run folder", root, then="try again")
        ) from error
    return run_dir


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Returns config.json as a dict; raises RunError when it is missing or unreadable."""
    data = read_json(Path(run_dir) / "config.json")
    if not isinstance(data, dict):
        raise RunError(f"{run_dir} is not a run folder: config.json is missing or unreadable")
    return upgrade(data, f"{Path(run_dir) / 'config.json'}")


def run_config(run_dir: str | os.PathLike) -> RunConfig:
    """Returns the RunConfig stored in a run folder (a setting added since the run was stored
    takes what the run trained with: config.stored_config)."""
    return stored_config(read_config(run_dir))


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Returns summary.json, or None before the run reached a final state."""
    data = read_json(Path(run_dir) / "summary.json")
    if not isinstance(data, dict):
        return None
    return upgrade(data, f"{Path(run_dir) / 'summary.json'}")


PREDICTIONS_FILE = "predictions.csv"  # written by the engine: split,index,true,pred,confidence


def read_hits(run_dir: str | os.PathLike, split: str = "val") -> list[bool] | None:
    """Returns, per image of the split in its order, whether the run's best weights got it
    right (predictions.csv), or None when the run has no readable predictions for it."""
    hits: list[bool] = []
    try:
        with open(Path(run_dir) / PREDICTIONS_FILE, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("split") == split:
                    hits.append(row["true"] == row["pred"])
    except (OSError, UnicodeDecodeError, csv.Error, KeyError):
        return None
    return hits or None


TUNING_FILE = "lr_tuning.json"  # written by the worker when it tuned the run's lr


def read_tuning(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Returns the run's lr search (tuning.LrTuning as a dict), or None when it had none."""
    data = read_json(Path(run_dir) / TUNING_FILE)
    return data if isinstance(data, dict) else None


def set_tuned_lr(run_dir: str | os.PathLike, tuning: dict[str, Any]) -> None:
    """Writes the lr search into the run folder, then the chosen lr into config.json (the
    lr the run trains with); the search is written first, so a crash between the two leaves
    a search the worker finds and applies again."""
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / TUNING_FILE, tuning)
    config = read_config(run_dir)
    config["lr"] = tuning["chosen_lr"]
    write_json_atomic(run_dir / "config.json", stamped(config))


def write_summary(run_dir: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Writes summary.json atomically, with every contract key present (null when unknown)."""
    full = {key: None for key in SUMMARY_KEYS}
    full["skipped_files"] = []
    full.update(summary)
    write_json_atomic(Path(run_dir) / "summary.json", stamped(full))


def check_action(run_dir: str | os.PathLike, actor: str | None, doing: str) -> None:
    """Raises access.NotAllowed when actor may not `doing` ("stop", "delete", ...) the run:
    another user's run, or a read-only demo (store/access.py). The local mode (actor None)
    may do anything the run's state allows."""
    run_dir = Path(run_dir)
    if actor is None:
        access.refuse_in_demo(f"{doing} run {run_dir.name}")
        return
    access.check_owner(read_config(run_dir), run_dir.name, actor, doing)


def rename_run(run_dir: str | os.PathLike, name: str, *, actor: str | None = None) -> None:
    """Sets the run's label (config "name"); the run id does not change. Refused for another
    user's run (check_action)."""
    run_dir = Path(run_dir)
    name = str(name).strip()
    if len(name) > 100:
        raise RunError("a run name must be at most 100 characters")
    check_action(run_dir, actor, access.RENAME)
    config = read_config(run_dir)
    config["name"] = name
    write_json_atomic(run_dir / "config.json", stamped(config))


def delete_run(run_dir: str | os.PathLike, *, actor: str | None = None) -> None:
    """Deletes a run folder; refuses a queued or running run (stop or cancel it first), and
    another user's run (check_action)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise RunError(f"{run_dir} is not a run folder; nothing deleted")
    check_action(run_dir, actor, access.DELETE)
    state = read_status(run_dir).get("state")
    if state in LIVE_STATES or state in ACTIVE_STATES:
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
