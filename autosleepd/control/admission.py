"""Admission: work in flight and work held, the only truth about activity.

A held request waits on a future, in arrival order, until the supervisor lets everything through
(``release_all``), refuses everything (``refuse_all``), or its own deadline passes. A client that
goes away leaves the queue and leaves no trace in any counter.

With worker processes (``workers/``), work they forward themselves is counted in their shared
segment (``elsewhere``): ``in_flight`` and ``last_work_end`` include it. Its end is not signalled
(a message per request would cost what the workers save), so while workers have work in flight
the control loop looks again every ELSEWHERE_POLL (``look_again``): a drain or an idle window
that ends in a worker is seen within that. With none in flight it still looks every
ELSEWHERE_IDLE_POLL: the plan it waits on was made from an earlier reading, and work that ended
in a worker between that reading and this one would otherwise leave it waiting for ever (no
plan, nothing to wake it), an engine kept awake.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from ..clock import Clock
from .states import State
from .status import Status


ELSEWHERE_POLL = 0.02       # seconds, while workers have work in flight
ELSEWHERE_IDLE_POLL = 1.0   # seconds, while they have none


class HoldExpired(Exception):
    """A held request's deadline passed before it was let through."""


@dataclass
class _Hold:
    work: bool            # False for a manual wake: it waits, but is not a request in flight
    since: float


class Admission:
    def __init__(self, clock: Clock, on_change: Callable[[], None],
                 on_abandoned: Callable[[], None], on_drained: Callable[[], None] | None = None):
        self._clock = clock
        self._on_change = on_change          # wakes the control loop
        self._on_drained = on_drained or on_change   # in flight reached 0
        self._on_abandoned = on_abandoned    # a held client went away
        self._held: dict[asyncio.Future, _Hold] = {}   # dicts keep arrival order
        self.queued = 0                      # holds that are work (the rest are manual wakes)
        self.own_in_flight = 0               # admitted here, not yet finished
        self._last_work_end = clock.now()
        self.elsewhere = None                # the workers' shared segment: .in_flight(), .last_activity()
        self.drained = asyncio.Event()
        self.drained.set()

    @property
    def waiting(self) -> bool:
        """Anyone held: work, or a manual wake."""
        return bool(self._held)

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self._held

    @property
    def in_flight(self) -> int:
        """Admitted work not yet finished, here and in worker processes."""
        if self.elsewhere is None:
            return self.own_in_flight
        return self.own_in_flight + self.elsewhere.in_flight()

    def look_again(self, deadline: float | None) -> float | None:
        """When the control loop, waiting until ``deadline``, must look at the workers again."""
        if self.elsewhere is None:
            return deadline
        soon = self._clock.now() + (ELSEWHERE_POLL if self.elsewhere.in_flight() else ELSEWHERE_IDLE_POLL)
        return soon if deadline is None else min(deadline, soon)

    @property
    def last_work_end(self) -> float:
        if self.elsewhere is None:
            return self._last_work_end
        return max(self._last_work_end, self.elsewhere.last_activity())

    @last_work_end.setter
    def last_work_end(self, when: float) -> None:
        self._last_work_end = when

    def enter(self) -> None:
        self.own_in_flight += 1
        self.drained.clear()

    def leave(self) -> None:
        self.own_in_flight -= 1
        self._last_work_end = self._clock.now()
        if self.own_in_flight == 0:
            self.drained.set()
            self._on_drained()

    async def hold(self, work: bool, deadline: float) -> None:
        """Wait until let through (work is then counted in flight); raise ``HoldExpired``."""
        future = asyncio.get_running_loop().create_future()
        self._held[future] = _Hold(work, self._clock.now())
        self.queued += work
        timer = self._clock.call_at(deadline, lambda: future.done() or future.set_exception(HoldExpired()))
        self._on_change()
        try:
            await future
        except asyncio.CancelledError:
            if not future.done() or future.cancelled():
                self._on_abandoned()
            elif work and future.exception() is None:
                self.leave()   # let in, then cancelled before it could run: give the place back
            raise
        finally:
            timer.cancel()
            if self._held.pop(future, None) is not None:
                self.queued -= work
                self._on_change()

    def release_all(self) -> list[float]:
        """Let every held request through, in arrival order; return how long each work waited."""
        now = self._clock.now()
        held, self._held, self.queued = self._held, {}, 0
        waited = []
        for future, hold in held.items():
            if future.done():
                continue
            if hold.work:
                self.enter()
                waited.append(now - hold.since)
            future.set_result(None)
        return waited

    def refuse_all(self, error: Exception) -> None:
        for future in list(self._held):
            if not future.done():
                future.set_exception(error)


def why_expired(status: Status, wake_timeout: float,
                memory_wait: str | None) -> tuple[str, str, float | None]:
    """The refusal a held request gets at its deadline: (reason, message, Retry-After or None)."""
    if memory_wait is not None:
        return ("no_gpu_memory", "not enough GPU memory to wake the engine within "
                f"{wake_timeout:g}s: {memory_wait}", None)
    if status.state is State.BROKEN:
        return ("engine_broken", "the engine is broken (a wake failed: "
                f"{status.stats.broken_reason}); it needs a restart", None)
    if status.state in (State.STARTING, State.UNAVAILABLE):
        return "engine_unavailable", f"the engine did not answer within {wake_timeout:g}s", None
    if status.state in (State.STOPPED, State.LAUNCHING):
        # A cold start: Retry-After from the last measured one, less what this one has taken.
        measured, left = status.stats.last_start_seconds, None
        if measured is not None:
            left = max(1.0, measured - (status.state_seconds if status.state is State.LAUNCHING else 0))
        took = f"; the last took {measured:g}s" if measured is not None else ""
        return ("wake_timeout", f"the stopped engine did not start within {wake_timeout:g}s (a "
                f"cold start{took}); the start goes on. AUTOSLEEPD_WAKE_TIMEOUT above the start "
                "time holds requests through it", left)
    # Retry-After from what the wake is expected to take still (the last one's duration).
    expected, left = status.stats.last_wake_seconds, None
    if status.state is State.WAKING and expected is not None:
        left = max(1.0, expected - status.state_seconds)
    return ("wake_timeout", f"the engine did not wake within {wake_timeout:g}s "
            f"(state: {status.state.value}); the wake goes on", left)
