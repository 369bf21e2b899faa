"""Who may do what to a run on a shared server: owners and admins, the read-only demo mode,
what a user may see, and each user's own folder (saved form, uploads). No streamlit here:
the pages, the CLI and the queue ask the same rules.

An actor is a user key (`user_key`: the signed-in user's e-mail address by default, see
FINETUNE_USER_CLAIM) or None. None is the local mode of today, the CLI's default and the
dashboard without sign-in: nothing is checked, nothing is recorded. A signed-in user (or the
CLI's `--as USER`) owns the runs they create ("owner" in config.json); only the owner or an
admin (FINETUNE_ADMINS) may stop, cancel, resume, rename or delete one, and only an admin may
change how many runs train at once. A run without an owner (made in the local mode) is an
admin's to act on. Refusals raise NotAllowed, a RunError, with a message that says why.

The settings are environment variables, read at every call, so that the dashboard, the CLI
and the queue of one server read the same ones (README, "A hosted team demo"):

    FINETUNE_DEMO=1                  read-only: no launch, upload, stop, resume, rename, delete
    FINETUNE_ADMINS=a@x.org,b@x.org  users who may act on every run and set the queue
    FINETUNE_USER_CLAIM=email        the sign-in claim that names a user: email (default) | sub
    FINETUNE_HIDE_OTHERS_RUNS=1      a user sees only their own runs (admins see all)
    FINETUNE_SHARE_IMAGES=1          everyone sees every run's images (default: owner, admins)
    FINETUNE_USER_MAX_QUEUED=20      runs one user may have queued at once (0: no limit)
    FINETUNE_USER_DISK_GB=20         disk one user's runs and uploads may take (0: no limit)
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune_core.store.schema import RunError

USERS_DIR = ".users"  # <runs>/.users/<user folder>/: a user's saved form and uploads
DEFAULT_MAX_QUEUED = 20  # a depth sweep with three seeds is 18 runs
DEFAULT_DISK_GB = 20.0
_YES = ("1", "true", "yes", "on")

# what an actor does to a run, in the words of the messages
STOP, CANCEL, RESUME, RENAME, DELETE = "stop", "cancel", "resume", "rename", "delete"


class NotAllowed(RunError):
    """An action this user may not take here: another user's run, the read-only demo, a
    setting for admins, or a limit reached. Nothing was changed."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _YES


def _number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return value if value >= 0 else default


def demo_mode() -> bool:
    """Returns True when this server is a read-only demo ($FINETUNE_DEMO)."""
    return _flag("FINETUNE_DEMO")


DEMO_MESSAGE = (
    "this dashboard is a read-only demo (FINETUNE_DEMO is set): runs can be browsed and "
    "compared, but not launched, uploaded to, stopped, resumed, renamed or deleted"
)


def refuse_in_demo(doing: str) -> None:
    """Raises NotAllowed saying the demo is read-only, when it is."""
    if demo_mode():
        raise NotAllowed(f"cannot {doing}: {DEMO_MESSAGE}")


def user_key(text: str | None) -> str | None:
    """Returns the key a user is known by (trimmed, lower case: e-mail addresses and subjects
    are compared without case), or None for no user."""
    key = str(text).strip().lower() if text is not None else ""
    return key or None


def user_claim() -> str:
    """Returns the sign-in claim that names a user: "email" (default) or "sub"."""
    claim = os.environ.get("FINETUNE_USER_CLAIM", "").strip().lower()
    return claim if claim in ("email", "sub") else "email"


def admins() -> frozenset[str]:
    """Returns the admins' user keys ($FINETUNE_ADMINS, comma-separated)."""
    raw = os.environ.get("FINETUNE_ADMINS", "")
    return frozenset(k for k in (user_key(p) for p in raw.split(",")) if k)


def is_admin(actor: str | None) -> bool:
    """Returns True for an admin; the local mode (actor None) acts as one."""
    return actor is None or user_key(actor) in admins()


def owner_of(config: Mapping[str, Any]) -> str | None:
    """Returns the user key of a run's owner (config.json "owner"), None for a local run."""
    owner = config.get("owner")
    return user_key(owner) if isinstance(owner, str) else None


def may_act(config: Mapping[str, Any], actor: str | None) -> bool:
    """Returns True when actor may stop, cancel, resume, rename or delete the run."""
    return is_admin(actor) or owner_of(config) == user_key(actor)


def check_owner(config: Mapping[str, Any], run_id: str, actor: str | None, doing: str) -> None:
    """Raises NotAllowed when actor may not `doing` the run (the demo refuses everyone)."""
    refuse_in_demo(f"{doing} run {run_id}")
    if may_act(config, actor):
        return
    owner = owner_of(config)
    whose = f"belongs to {owner}" if owner else "was made before sign-in (it has no owner)"
    raise NotAllowed(
        f"cannot {doing} run {run_id}: it {whose}; only its owner or an admin "
        "(FINETUNE_ADMINS) can stop, cancel, resume, rename or delete it"
    )


def check_admin(actor: str | None, doing: str) -> None:
    """Raises NotAllowed when actor is not an admin (or the demo is read-only)."""
    refuse_in_demo(doing)
    if not is_admin(actor):
        raise NotAllowed(f"cannot {doing}: only an admin (FINETUNE_ADMINS) can")


def hide_others_runs() -> bool:
    """Returns True when users see only their own runs ($FINETUNE_HIDE_OTHERS_RUNS)."""
    return _flag("FINETUNE_HIDE_OTHERS_RUNS")


def may_see_run(config: Mapping[str, Any], actor: str | None) -> bool:
    """Returns True when actor may see the run in lists, Training and Compare."""
    return not hide_others_runs() or may_act(config, actor)


def may_see_images(config: Mapping[str, Any], actor: str | None) -> bool:
    """Returns True when actor may see the run's images (its scored val and test images):
    its owner and admins, everyone with $FINETUNE_SHARE_IMAGES."""
    return _flag("FINETUNE_SHARE_IMAGES") or may_act(config, actor)


def max_queued() -> int:
    """Returns how many runs one user may have queued at once (0: no limit)."""
    return int(_number("FINETUNE_USER_MAX_QUEUED", DEFAULT_MAX_QUEUED))


def disk_limit_bytes() -> int:
    """Returns the disk one user's runs and uploads may take, in bytes (0: no limit)."""
    return int(_number("FINETUNE_USER_DISK_GB", DEFAULT_DISK_GB) * 1e9)


def user_home(runs_dir: str | os.PathLike, actor: str | None) -> Path:
    """Returns the folder of a user's saved form and uploads: <runs>/.users/<name>-<digest>
    (a readable name safe on any file system, and a digest of the key, so that no two users
    share one); the runs folder itself in the local mode."""
    key = user_key(actor)
    if key is None:
        return Path(runs_dir)
    readable = re.sub(r"[^a-z0-9._@-]+", "_", key).strip("._")[:60] or "user"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(runs_dir) / USERS_DIR / f"{readable}-{digest}"


def foreign_upload(spec: str, runs_dir: str | os.PathLike, actor: str | None) -> str | None:
    """Returns why a signed-in user may not train on this data or weights path (an upload
    kept for another user, or from before sign-in), or None when they may."""
    if actor is None or is_admin(actor) or not spec or ":" in spec.split("/", 1)[0]:
        return None  # the local mode, an admin, or builtin:, torchvision:, run:
    try:
        path = Path(spec).expanduser().resolve()
        root = Path(runs_dir).resolve()
    except (OSError, RuntimeError):
        return None
    shared = [root / ".uploads", root / USERS_DIR]
    if not any(path == s or s in path.parents for s in shared):
        return None
    own = user_home(root, actor)
    if own in path.parents:
        return None
    return f"{path.name} is an upload of another user; upload your own copy of it"
