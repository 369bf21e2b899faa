"""The CLI flags of a run that trains in seconds on 2 cores (built-in shapes, ResNet-18 from
random init, 32 px, one epoch of batch 64, no augmentation), shared by the tests that train
one through the real CLI or the queue, and waiting for such a run's status."""

from __future__ import annotations

import time
from pathlib import Path

from finetune_core import store

TINY_RUN = {
    "data": "builtin:shapes",
    "model": "resnet18",
    "weights": "none",
    "image-size": "32",
    "epochs": "1",
    "batch-size": "64",
    "augment": "none",
}


def tiny_flags(**changes: object) -> list[str]:
    """Returns the tiny run's flags with `changes` (a flag's name with `_` for `-`, e.g.
    `unfreeze_last=1`) set or added, in the order given; a change to None drops the flag."""
    flags = dict(TINY_RUN)
    for name, value in changes.items():
        key = name.replace("_", "-")
        if value is None:
            flags.pop(key, None)
        else:
            flags[key] = str(value)
    return [part for key, value in flags.items() for part in (f"--{key}", value)]


def tiny_config(**changes: object) -> dict:
    """Returns the tiny run as RunConfig keyword arguments, with `changes` set or added."""
    fields = {key.replace("-", "_"): value for key, value in TINY_RUN.items()}
    fields.update(image_size=32, epochs=1, batch_size=64)  # the numbers as numbers
    return {**fields, **changes}


def wait_for_status(run_dir: Path, predicate, timeout: float = 600, what: str = "the run") -> dict:
    """Returns the run's status once predicate(status) holds; fails after timeout seconds
    with the status, the end of worker.log and of the folder's supervisor.log."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = store.read_status(run_dir)
        if predicate(status):
            return status
        time.sleep(0.2)
    supervisor = run_dir.parent / "supervisor.log"
    raise AssertionError(
        f"{what} did not get there in {timeout} s: {status}\n{store.read_log_tail(run_dir, 40)}\n"
        + (supervisor.read_text()[-3000:] if supervisor.exists() else "")
    )
