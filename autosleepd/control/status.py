"""What the supervisor knows, as one typed snapshot: read by status, metrics, planners, neighbours.

``Stats`` are the running counts the supervisor keeps; ``Status`` is a frozen snapshot of them
with the present state. ``Status.to_json()`` is the wire form of ``GET /autosleepd/status``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .states import Event, Outcome, State


@dataclass
class Stats:
    sleeps: int = 0
    wakes: int = 0
    sleep_failures: int = 0
    wake_failures: int = 0
    last_sleep_seconds: float | None = None
    last_wake_seconds: float | None = None
    last_engine_wake_seconds: float | None = None   # the engine's wake calls alone
    last_error: str | None = None
    gpu_memory_freed_bytes: int | None = None       # what the last sleep gave back, as NVML saw it
    memory_waits: int = 0          # wakes that had to wait for GPU memory
    prewakes: int = 0              # wakes ahead of traffic (schedule or learned)
    ladder_steps: int = 0          # sleeps deepened along the ladder
    ladder_skips: int = 0          # steps skipped: the GPU had no room for the wake
    restarts: int = 0              # runs of the restart command
    recycles: int = 0              # restarts of an asleep engine whose leftover memory grew
    check_failures: int = 0        # wakes whose output check failed
    broken_reason: str | None = None
    stops: int = 0                 # the engine stopped at the ladder's stop rung
    stop_failures: int = 0
    starts: int = 0                # the stopped engine started again, healthy
    start_failures: int = 0
    last_stop_seconds: float | None = None
    last_start_seconds: float | None = None   # a cold start: command, /health, check
    start_failure: str | None = None          # why the last start failed, until one succeeds
    config_error: str | None = None   # autosleepd's own calls were refused (an API key missing)

    def record(self, outcome: Outcome) -> None:
        """Count what a sleep or wake procedure reports."""
        event = outcome.event
        if event is Event.SLEPT:
            self.sleeps += 1
            self.last_sleep_seconds = round(outcome.seconds, 3)
            if outcome.freed is not None:
                self.gpu_memory_freed_bytes = outcome.freed
        elif event in (Event.WOKE, Event.FOUND_AWAKE):
            self.wakes += 1
            self.last_wake_seconds = round(outcome.seconds, 3)
            self.last_engine_wake_seconds = round(outcome.engine_seconds, 4)
        elif event is Event.SLEEP_FAILED:
            self.sleep_failures += 1
            self.last_error = outcome.detail
        elif event is Event.WAKE_FAILED:
            self.broken_reason = outcome.detail
        elif event is Event.ENGINE_STOPPED:
            self.stops += 1
            self.last_stop_seconds = round(outcome.seconds, 3)
        elif event is Event.STOP_FAILED:
            self.stop_failures += 1
            self.last_error = outcome.detail
        elif event is Event.ENGINE_STARTED:
            self.starts += 1
            self.last_start_seconds = round(outcome.seconds, 3)
            self.start_failure = None
        elif event is Event.START_FAILED:
            self.start_failures += 1
            self.start_failure = self.last_error = outcome.detail


@dataclass(frozen=True)
class Planned:
    """A planner's next transition: when (clock time), what (an order), and why, in words."""

    at: float
    order: str                     # an Event value: idle, ladder, schedule, prewake, recycle
    reason: str
    level: int | None = None       # the sleep level, for orders that end asleep
    key: str | None = None         # the planner's own reference (a pre-wake's slot)


@dataclass(frozen=True)
class Status:
    state: State
    state_seconds: float
    sleep_level: int               # asleep: the level it sleeps at; else the level it would
    sleep_supported: bool
    autosleep: bool
    idle_timeout_seconds: float
    idle_seconds: float
    in_flight: int
    queued: int
    upstream: str
    stats: Stats
    waiting_for_memory: dict | None = None
    memory: dict | None = None     # the memory guard's learned figures, when there is a guard
    residual_bytes: int | None = None   # GPU memory the engine kept at its last sleep
    cycles: int = 0                # sleeps since the engine (re)started
    next_transition: Planned | None = None
    prewakes_used: int | None = None
    prewakes_wasted: int | None = None
    power: dict | None = None      # the engine's GPU draw, energy per state, saving (gpu/power.py)
    level_auto: dict | None = None  # AUTOSLEEPD_SLEEP_LEVEL=auto: its last choice, the times it uses
    # Not on the wire: for planners, which work in clock time.
    now: float = field(default=0.0, repr=False)
    wall: float = field(default=0.0, repr=False)

    @property
    def last_work_end(self) -> float:
        return self.now - self.idle_seconds

    @property
    def state_since_wall(self) -> float:
        return self.wall - self.state_seconds

    def to_json(self) -> dict:
        upcoming = None
        if self.next_transition is not None:
            at = self.next_transition.at
            finite = math.isfinite(at)   # a pin until unpinned plans nothing it can date
            upcoming = {"at": datetime.fromtimestamp(self.wall + at - self.now, UTC)
                        .isoformat(timespec="seconds") if finite else None,
                        "in_seconds": round(max(0.0, at - self.now), 1) if finite else None,
                        "what": self.next_transition.reason}
        return {
            "state": self.state.value,
            "state_seconds": round(self.state_seconds, 3),
            "sleep_level": self.sleep_level,
            "sleep_supported": self.sleep_supported,
            "autosleep": self.autosleep,
            "idle_timeout_seconds": self.idle_timeout_seconds,
            "idle_seconds": round(self.idle_seconds, 3),
            "in_flight": self.in_flight,
            "queued": self.queued,
            "upstream": self.upstream,
            **dataclasses.asdict(self.stats),
            "waiting_for_memory": self.waiting_for_memory,
            "memory": self.memory,
            "residual_bytes": self.residual_bytes,
            "cycles": self.cycles,
            "next_transition": upcoming,
            "prewakes_used": self.prewakes_used,
            "prewakes_wasted": self.prewakes_wasted,
            "power": self.power,
            "sleep_level_auto": self.level_auto,
        }
