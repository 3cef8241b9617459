"""Time, passed in: the supervisor reads the clock and sets timers only through a ``Clock``.

``LoopClock`` is the event loop's monotonic clock. ``ManualClock`` moves only when a test calls
``advance``, so a five-minute idle window is tested in microseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Callable, Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...          # monotonic seconds: timers and durations

    def wall(self) -> float: ...         # epoch seconds: schedules and history

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer: ...


class LoopClock:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop or asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time()

    def wall(self) -> float:
        return time.time()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return self._loop.call_at(when, callback)


class _ManualTimer:
    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None] | None):
        self.callback = callback

    def cancel(self) -> None:
        self.callback = None


class ManualClock:
    def __init__(self, start: float = 1000.0, wall_start: float = 1_767_225_600.0):
        self._start = start
        self._wall_start = wall_start   # default: 2026-01-01 00:00 UTC, a Thursday
        self._now = start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall_start + (self._now - self._start)

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer(callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward, firing every timer that falls due, in order."""
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            if timer.callback is not None:
                callback, timer.callback = timer.callback, None
                callback()
        self._now = target

