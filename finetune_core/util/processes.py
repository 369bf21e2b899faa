"""Is the process that owns something still the same live process? (pid reuse included)"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _proc_stat(pid: int) -> list[str] | None:
    """Returns the fields of /proc/<pid>/stat after the command name, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    return text[text.rfind(")") + 2 :].split()


def process_start_time(pid: int) -> float | None:
    """Returns when process pid started (seconds since the epoch), or None where unknown."""
    fields = _proc_stat(pid)
    boot = _boot_time()
    if not fields or boot is None:
        return None
    # fields[0] is field 3 (state); field 22 (starttime, in clock ticks since boot) is [19].
    ticks = int(fields[19])
    return round(boot + ticks / os.sysconf("SC_CLK_TCK"), 2)


def process_alive(pid: int | None, started_at: float | None = None) -> bool:
    """Returns True when pid runs and, where started_at is known, is the process started then.

    A pid that is no positive whole number (as a broken status.json may hold) is no process.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    if isinstance(started_at, bool) or not isinstance(started_at, (int, float, type(None))):
        started_at = None
    if Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X"):  # gone, or a zombie nobody reaped yet
            return False
        if started_at is not None:
            now_started = process_start_time(pid)
            if now_started is not None and abs(now_started - float(started_at)) > 0.05:
                return False  # the pid was reused by another process
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def process_stopped(pid: int) -> bool:
    """Returns True when process pid is stopped (SIGSTOP, Ctrl-Z) or traced; False elsewhere."""
    fields = _proc_stat(pid)
    return bool(fields) and fields[0] in ("T", "t")


def send_signal(pid: int, sig: int, started_at: float | None = None) -> bool:
    """Sends sig to pid when it is still the process started at started_at; returns whether
    it was sent (never to a pid that another process took over since)."""
    if not process_alive(pid, started_at):
        return False
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
