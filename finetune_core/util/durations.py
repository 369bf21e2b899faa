"""Durations for people and the time left of a job that counts steps."""

from __future__ import annotations

import math
import time


def plural(n: int | float, word: str) -> str:
    """Returns "1 epoch", "3 epochs", "0.5 epochs" (a regular English plural)."""
    return f"{n:g} {word}" if n == 1 else f"{n:g} {word}s"


def fmt_duration(seconds: float | None) -> str:
    """Returns 42 s, 3 min 05 s or 1 h 02 min (– when unknown)."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def fmt_rough(seconds: float) -> str:
    """Returns a rounded estimate: 5 s (at least), 40 s, 3 min, 1.5 h."""
    if seconds < 90:
        return f"{max(5, round(seconds / 5) * 5):.0f} s"
    if seconds < 5400:
        return f"{round(seconds / 60):.0f} min"
    return f"{seconds / 3600:.1f} h"


def fmt_clock(seconds: float | None) -> str:
    """Returns mm:ss or h:mm:ss, for a progress bar (--:-- when unknown)."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def seconds_left(elapsed: float, done: float, remaining: float) -> float | None:
    """Returns the time `remaining` steps take at the pace of `done` steps in `elapsed`
    seconds, None before any progress."""
    if done <= 0:
        return None
    return elapsed / done * max(remaining, 0)


class Eta:
    """Time left of a loop of steps, from the pace since `start(step)` (a resumed run's steps
    before it do not count)."""

    def __init__(self):
        self.start()

    def start(self, step: int = 0) -> None:
        self.t0 = time.monotonic()
        self.step0 = step

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self, step: int, total: int | None) -> float | None:
        """Returns the seconds until `total` steps at the pace so far, or None."""
        if not total:
            return None
        return seconds_left(self.elapsed(), step - self.step0, total - step)
