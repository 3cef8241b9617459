"""Pins and keep-alives: an operator keeps an engine awake for a while, or a request asks for a
longer idle window (like Ollama's per-request ``keep_alive``).

Both are inputs of one planner: while either holds, ``keep_awake_until`` says so, which delays
the idle sleep (``Planners.next``) and refuses a neighbour's eviction (``order_evict``). A pinned
engine found asleep is woken, which also pre-empts any ladder step. The planner changes only
when the supervisor tells it (``pin``, ``unpin``, ``keep_alive``); it never acts.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from ..control.status import Planned, Status
from .planner import Planner

PIN_WAKE_RETRY = 60.0   # a pinned engine that could not be woken (no GPU room) is tried again


class PinPlanner(Planner):
    def __init__(self, keep_alive_max: float):
        self.keep_alive_max = keep_alive_max
        self.until: float | None = None     # clock time; math.inf: until unpinned
        self.until_wall: float | None = None
        self.keep_alive = 0.0               # idle window a request asked for, until the next sleep
        self._retry_at = 0.0

    # ----- inputs, from the supervisor ----------------------------------------------------------

    def pin(self, now: float, wall: float, seconds: float | None) -> None:
        self.until = math.inf if seconds is None else now + seconds
        self.until_wall = None if seconds is None else wall + seconds
        self._retry_at = 0.0

    def unpin(self) -> None:
        self.until = self.until_wall = None

    def ask_keep_alive(self, seconds: float) -> float:
        """A request's idle window, bounded by AUTOSLEEPD_KEEP_ALIVE_MAX; returns what holds."""
        self.keep_alive = max(self.keep_alive, min(seconds, self.keep_alive_max))
        return self.keep_alive

    # ----- the planner --------------------------------------------------------------------------

    def pinned(self, now: float) -> bool:
        return self.until is not None and now < self.until

    def plan(self, status: Status) -> Planned | None:
        if status.state.value != "asleep" or not self.pinned(status.now):
            return None
        return Planned(max(status.now, self._retry_at), "schedule", f"wake: {self._describe()}")

    def keep_awake_until(self, status: Status) -> tuple[float, str] | None:
        if self.pinned(status.now):
            return self.until, self._describe()
        if self.keep_alive and status.idle_seconds < self.keep_alive:
            return status.last_work_end + self.keep_alive, f"a request's keep-alive of {self.keep_alive:g}s"
        return None

    def observe(self, event: str, status: Status) -> None:
        if status.state.value == "asleep":
            self.keep_alive = 0.0   # a keep-alive lasts one awake spell, as Ollama's does
        if self.until is not None and not self.pinned(status.now):
            self.unpin()            # expired

    def done(self, planned: Planned, carried_out: bool, status: Status) -> None:
        if planned.order == "schedule" and not carried_out and self.pinned(status.now):
            self._retry_at = status.now + PIN_WAKE_RETRY

    # ----- reading ------------------------------------------------------------------------------

    def to_json(self, now: float) -> dict | None:
        if not self.pinned(now):
            return None
        if self.until == math.inf:
            return {"until": None, "in_seconds": None, "text": "pinned until unpinned"}
        return {"until": _iso(self.until_wall), "in_seconds": round(self.until - now, 1),
                "text": self._describe()}

    def _describe(self) -> str:
        if self.until == math.inf:
            return "the pin (until unpinned)"
        return f"the pin until {_iso(self.until_wall)}"


def _iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")
