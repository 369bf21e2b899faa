"""An exclusive lock on a file, shared by processes: waited for, or tried once and held."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


class FileLock:
    """An exclusive lock on `path` (created when missing), released when the holder closes it
    or exits. Use `with FileLock(path):` to wait for it, or `try_acquire()` to take it only
    when it is free and hold it (the supervisor holds its lock for its whole life)."""

    def __init__(self, path: str | os.PathLike, *, on_wait: Callable[[], None] | None = None):
        self.path = Path(path)
        self.on_wait = on_wait  # called once when the lock is busy and we start waiting
        self.fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    @staticmethod
    def _lock(fd: int, blocking: bool) -> bool:
        if fcntl is None:
            mode = msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK
            try:
                msvcrt.locking(fd, mode, 1)
                return True
            except OSError:
                return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False

    def try_acquire(self) -> bool:
        """Takes the lock when it is free and returns True; False at once when it is held."""
        fd = self._open()
        if self._lock(fd, blocking=False):
            self.fd = fd
            return True
        os.close(fd)
        return False

    def acquire(self) -> None:
        """Waits until the lock is free, then holds it (on_wait is told once if it was busy)."""
        fd = self._open()
        if self.on_wait is None:
            self._lock(fd, blocking=True)
        else:
            waited = False
            while not self._lock(fd, blocking=False):
                if not waited:
                    self.on_wait()
                    waited = True
                time.sleep(0.5)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None

    def write_owner(self, text: str) -> None:
        """Replaces the lock file's content (who holds it, for people); the lock must be held."""
        os.ftruncate(self.fd, 0)
        os.write(self.fd, text.encode())

    def held_elsewhere(self) -> bool:
        """Returns True when another holder has the lock now (it is not taken here)."""
        if not self.path.exists():
            return False
        if self.try_acquire():
            self.release()
            return False
        return True

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
