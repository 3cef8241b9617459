"""Every rule of the engine's state machine: the states, the events, and the table between them.

Theory of operation
-------------------
autosleepd believes the engine is in one of ten states. Only the control loop
(``supervisor.Supervisor.run``) moves that belief, and only by applying an *event* to this table:

- **probes** read the engine's real state (``found_awake``, ``found_asleep``, ``probe_failed``,
  and ``found_stopped``: at start, with a stop rung, the engine's port refuses);
- **orders** are decisions to sleep, wake or stop, with the reason recorded (``idle``, ``manual``,
  ``eviction``, ``ladder``, ``request``, ``stuck``, ``schedule``, ``prewake``, ``recycle``,
  ``stop``);
- **outcomes** are what a slow procedure reports when it ends (``slept``, ``sleep_failed``,
  ``drain_timeout``, ``woke``, ``wake_abandoned``, ``no_gpu_memory``, ``wake_failed``,
  ``check_failed``, ``recovered``, ``engine_stopped``, ``stop_failed``, ``engine_started``,
  ``start_failed``).

``TRANSITIONS`` maps (state, event) to the next state. A pair that maps a state to itself is
an event that moves nothing (a probe confirming what was believed). A pair in ``REFUSED`` cannot
happen by construction, or is refused on purpose; applying one is a bug. Every other pair is
missing on purpose too, and a test checks that the two tables cover every pair.

Entering a state has effects, declared in ``ON_ENTER``: entering ``awake`` releases the held
requests; entering ``broken`` plans a restart; entering ``asleep`` or ``unavailable`` keeps them
held. The supervisor runs these effects in one place (``Supervisor._apply``).

The transient states ``falling_asleep``, ``waking``, ``stopping`` and ``launching`` are each owned
by one procedure (``sleep.py``, ``wake.py``, ``stop.py`` twice) that returns an outcome; the loop
turns the outcome into an event.

The stop rung (``AUTOSLEEPD_LADDER=5m:1,2h:2,12h:stop``) takes an engine asleep at the ladder's
deepest level to ``stopped``: its process is gone (the stop command ran, the port refuses), so
the GPU draws what it draws without a CUDA context. ``stopped`` is not ``unavailable``: nothing
restarts it as broken, and a probe that finds it answering (an operator started it) follows it.
An autosleepd that starts (or restarts) with a stop rung and finds the engine's port refusing
takes it as stopped too, so the next request starts it (the start command must be idempotent,
as ``systemctl start`` is: the engine may be loading already).
The next request (or manual wake) runs the start command once (``launching``); held work is
released when the started engine is healthy and passes the wake check, and refused (503, with
backoff before the next try) when the start fails.
Work that arrives in any state but ``awake`` is held (bounded by AUTOSLEEPD_WAKE_TIMEOUT and
AUTOSLEEPD_MAX_QUEUE); nothing but control calls reaches an engine that is not awake.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass


class State(str, enum.Enum):
    STARTING = "starting"              # not yet read from the engine
    AWAKE = "awake"
    FALLING_ASLEEP = "falling_asleep"  # draining, then /sleep
    ASLEEP = "asleep"
    WAKING = "waking"                  # waiting for GPU room, then the wake calls and their check
    UNAVAILABLE = "unavailable"        # the engine does not answer (down, restarting, loading)
    BROKEN = "broken"                  # a wake failed for good: only a restart helps
    STOPPING = "stopping"              # the stop command runs, then the port must refuse
    STOPPED = "stopped"                # stopped on purpose (the ladder's stop rung)
    LAUNCHING = "launching"            # the start command ran; waiting for /health and the check


class Event(str, enum.Enum):
    # probes
    FOUND_AWAKE = "found_awake"
    FOUND_ASLEEP = "found_asleep"
    PROBE_FAILED = "probe_failed"
    FOUND_STOPPED = "found_stopped"    # at start, with a stop rung: the port refuses
    # orders to sleep
    IDLE = "idle"
    MANUAL_SLEEP = "manual"
    EVICTION = "eviction"
    LADDER = "ladder"                  # from asleep: wake for a deeper sleep; from awake: sleep deeper
    # orders to wake
    REQUEST = "request"
    STUCK = "stuck"                    # work reached an engine found asleep behind our back
    MANUAL_WAKE = "manual_wake"
    SCHEDULE = "schedule"
    PREWAKE = "prewake"
    # recycling: restart an asleep engine whose leftover memory grew (vLLM #36651)
    RECYCLE = "recycle"
    # the ladder's stop rung: stop the engine's process
    STOP = "stop"
    # outcomes
    SLEPT = "slept"
    SLEEP_FAILED = "sleep_failed"
    DRAIN_TIMEOUT = "drain_timeout"
    WOKE = "woke"
    WAKE_ABANDONED = "wake_abandoned"  # a failed or unstarted wake that nobody waits for any more
    NO_GPU_MEMORY = "no_gpu_memory"    # nobody waits any more, and the GPU never had room
    WAKE_FAILED = "wake_failed"        # an explicit failure for good: OOM, errors, deadline, check
    CHECK_FAILED = "check_failed"      # the one-token check beside released work failed
    RECOVERED = "recovered"            # a restarted engine answers awake and passes the check
    ENGINE_STOPPED = "engine_stopped"  # the stop command ran and the port refuses
    STOP_FAILED = "stop_failed"        # the engine still answers asleep after the stop command
    ENGINE_STARTED = "engine_started"  # the started engine is healthy, awake and checked
    START_FAILED = "start_failed"      # the start command failed, or no health in time

    @property
    def reason(self) -> str:
        """The reason label in logs and metrics: both manual orders are ``manual``."""
        return "manual" if self in (Event.MANUAL_SLEEP, Event.MANUAL_WAKE) else self.value


SLEEP_ORDERS = (Event.IDLE, Event.MANUAL_SLEEP, Event.EVICTION, Event.LADDER)
WAKE_ORDERS = (Event.REQUEST, Event.STUCK, Event.MANUAL_WAKE, Event.SCHEDULE, Event.PREWAKE, Event.LADDER)
START_ORDERS = (Event.REQUEST, Event.MANUAL_WAKE)   # only a waiting client starts a stopped engine

TRANSITIONS: dict[tuple[State, Event], State] = {
    # starting: hold everything until the engine has been read once
    (State.STARTING, Event.FOUND_AWAKE): State.AWAKE,
    (State.STARTING, Event.FOUND_ASLEEP): State.ASLEEP,
    (State.STARTING, Event.PROBE_FAILED): State.STARTING,
    (State.STARTING, Event.FOUND_STOPPED): State.STOPPED,     # stopped before autosleepd started
    # awake
    **{(State.AWAKE, order): State.FALLING_ASLEEP for order in SLEEP_ORDERS},
    (State.AWAKE, Event.FOUND_AWAKE): State.AWAKE,
    (State.AWAKE, Event.FOUND_ASLEEP): State.ASLEEP,        # slept behind our back
    (State.AWAKE, Event.PROBE_FAILED): State.UNAVAILABLE,
    (State.AWAKE, Event.CHECK_FAILED): State.BROKEN,
    # falling asleep: the sleep procedure reports
    (State.FALLING_ASLEEP, Event.SLEPT): State.ASLEEP,
    (State.FALLING_ASLEEP, Event.FOUND_ASLEEP): State.ASLEEP,   # read right before /sleep: already asleep
    (State.FALLING_ASLEEP, Event.SLEEP_FAILED): State.AWAKE,
    (State.FALLING_ASLEEP, Event.DRAIN_TIMEOUT): State.AWAKE,
    (State.FALLING_ASLEEP, Event.PROBE_FAILED): State.UNAVAILABLE,
    # asleep
    **{(State.ASLEEP, order): State.WAKING for order in WAKE_ORDERS},
    (State.ASLEEP, Event.FOUND_ASLEEP): State.ASLEEP,
    (State.ASLEEP, Event.FOUND_AWAKE): State.AWAKE,          # woken behind our back
    (State.ASLEEP, Event.PROBE_FAILED): State.UNAVAILABLE,
    (State.ASLEEP, Event.RECYCLE): State.UNAVAILABLE,        # restarting; a fresh engine follows
    (State.ASLEEP, Event.STOP): State.STOPPING,
    # waking: the wake procedure reports
    (State.WAKING, Event.WOKE): State.AWAKE,
    (State.WAKING, Event.FOUND_AWAKE): State.AWAKE,          # a wake call failed, yet the engine is awake
    (State.WAKING, Event.WAKE_ABANDONED): State.ASLEEP,
    (State.WAKING, Event.NO_GPU_MEMORY): State.ASLEEP,
    (State.WAKING, Event.WAKE_FAILED): State.BROKEN,
    (State.WAKING, Event.PROBE_FAILED): State.UNAVAILABLE,
    # unavailable: only a probe moves it
    (State.UNAVAILABLE, Event.FOUND_AWAKE): State.AWAKE,
    (State.UNAVAILABLE, Event.FOUND_ASLEEP): State.ASLEEP,
    (State.UNAVAILABLE, Event.PROBE_FAILED): State.UNAVAILABLE,
    # broken: only a restarted engine that answers awake and passes the check
    (State.BROKEN, Event.RECOVERED): State.AWAKE,
    (State.BROKEN, Event.PROBE_FAILED): State.BROKEN,
    (State.BROKEN, Event.FOUND_ASLEEP): State.BROKEN,        # still the zombie
    # stopping: the stop procedure reports what the engine is after its command
    (State.STOPPING, Event.ENGINE_STOPPED): State.STOPPED,
    (State.STOPPING, Event.STOP_FAILED): State.ASLEEP,
    (State.STOPPING, Event.FOUND_AWAKE): State.AWAKE,        # someone woke it meanwhile
    # stopped: a waiting client starts it; a probe follows an engine started by someone else
    **{(State.STOPPED, order): State.LAUNCHING for order in START_ORDERS},
    (State.STOPPED, Event.PROBE_FAILED): State.STOPPED,
    (State.STOPPED, Event.FOUND_AWAKE): State.AWAKE,
    (State.STOPPED, Event.FOUND_ASLEEP): State.ASLEEP,
    # launching: the start procedure reports
    (State.LAUNCHING, Event.ENGINE_STARTED): State.AWAKE,
    (State.LAUNCHING, Event.FOUND_ASLEEP): State.ASLEEP,     # it came up asleep: woken next
    (State.LAUNCHING, Event.START_FAILED): State.STOPPED,
    (State.LAUNCHING, Event.CHECK_FAILED): State.BROKEN,     # it started, but answers wrong
}

# Pairs that never reach the table. Orders are only given where they apply (the loop gives a
# sleep order only while awake, a wake order only while asleep); outcomes come only from the
# procedure that owns their transient state; a broken engine is not believed on a plain
# probe (it must pass the check: RECOVERED); nothing else but the two procedures' outcomes and a
# probe failure can happen while one of them runs.
_ORDERS = set(SLEEP_ORDERS) | set(WAKE_ORDERS) | {Event.RECYCLE, Event.STOP}
_SLEEP_OUTCOMES = {Event.SLEPT, Event.SLEEP_FAILED, Event.DRAIN_TIMEOUT}
_WAKE_OUTCOMES = {Event.WOKE, Event.WAKE_ABANDONED, Event.NO_GPU_MEMORY, Event.WAKE_FAILED}
_STOP_OUTCOMES = {Event.ENGINE_STOPPED, Event.STOP_FAILED}
_START_OUTCOMES = {Event.ENGINE_STARTED, Event.START_FAILED}
# The procedures of stopping and launching read the engine themselves: no probe runs meanwhile.
_OWN_PROBES = {State.STOPPING, State.LAUNCHING}
REFUSED: frozenset[tuple[State, Event]] = frozenset(
    (state, event) for state, event in itertools.product(State, Event)
    if (state, event) not in TRANSITIONS and (
        event in _ORDERS
        or (event in _SLEEP_OUTCOMES and state is not State.FALLING_ASLEEP)
        or (event in _WAKE_OUTCOMES and state is not State.WAKING)
        or (event in _STOP_OUTCOMES and state is not State.STOPPING)
        or (event in _START_OUTCOMES and state is not State.LAUNCHING)
        or (event is Event.CHECK_FAILED and state not in (State.AWAKE, State.LAUNCHING))
        or (event is Event.RECOVERED and state is not State.BROKEN)
        or (event is Event.FOUND_AWAKE and state in (State.FALLING_ASLEEP, State.BROKEN,
                                                     State.LAUNCHING))
        or (event is Event.FOUND_ASLEEP and state in (State.WAKING, State.STOPPING))
        or (event is Event.PROBE_FAILED and state in _OWN_PROBES)
        or (event is Event.FOUND_STOPPED and state is not State.STARTING)))

# Effects of entering a state, run by Supervisor._apply after the state has changed.
ON_ENTER: dict[State, tuple[str, ...]] = {
    State.AWAKE: ("release_held",),          # held work goes to the engine, in arrival order
    State.ASLEEP: ("settle_sleep_order",),   # a manual sleep waiting for this answer gets it
    State.BROKEN: ("plan_restart",),         # run the restart command at once, then with backoff
    State.UNAVAILABLE: ("probe_soon",),      # re-read the engine quickly, then backing off
    State.STOPPED: ("answer_held_after_failed_start", "probe_later"),
}


def next_state(state: State, event: Event) -> State:
    """The state ``event`` leads to from ``state``; a refused pair is a bug."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise AssertionError(f"event {event.value} cannot happen in state {state.value}") from None


def table_markdown() -> str:
    """The transition table as the README shows it (a test keeps the two equal)."""
    lines = ["| state | events | next state |", "|---|---|---|"]
    for state in State:
        targets: dict[State, list[str]] = {}
        for (source, event), target in TRANSITIONS.items():
            if source is state:
                targets.setdefault(target, []).append(f"`{event.value}`")
        for target, events in targets.items():
            shown = "(stays)" if target is state else f"`{target.value}`"
            lines.append(f"| `{state.value}` | {', '.join(events)} | {shown} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Outcome:
    """What a slow procedure reports when it ends: an event, and what the loop needs to know."""

    event: Event
    detail: str | None = None            # what went wrong, in words
    level: int | None = None
    seconds: float | None = None         # the whole procedure
    engine_seconds: float | None = None  # the engine's own calls
    freed: int | None = None             # GPU bytes a sleep gave back, as NVML saw it
    exit_status: int | None = None       # a stop or start command's, when it ran


if __name__ == "__main__":
    print(table_markdown())
