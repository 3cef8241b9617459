"""Every rule of the engine's state machine: the states, the events, and the table between them.

Theory of operation
-------------------
autosleepd believes the engine is in one of seven states. Only the control loop
(``supervisor.Supervisor.run``) moves that belief, and only by applying an *event* to this table:

- **probes** read the engine's real state (``found_awake``, ``found_asleep``, ``probe_failed``);
- **orders** are decisions to sleep or wake, with the reason recorded (``idle``, ``manual``,
  ``eviction``, ``ladder``, ``request``, ``stuck``, ``schedule``, ``prewake``, ``recycle``);
- **outcomes** are what a slow procedure reports when it ends (``slept``, ``sleep_failed``,
  ``drain_timeout``, ``woke``, ``wake_abandoned``, ``no_gpu_memory``, ``wake_failed``,
  ``check_failed``, ``recovered``).

``TRANSITIONS`` maps (state, event) to the next state. A pair that maps a state to itself is
an event that moves nothing (a probe confirming what was believed). A pair in ``REFUSED`` cannot
happen by construction, or is refused on purpose; applying one is a bug. Every other pair is
missing on purpose too, and a test checks that the two tables cover every pair.

Entering a state has effects, declared in ``ON_ENTER``: entering ``awake`` releases the held
requests; entering ``broken`` plans a restart; entering ``asleep`` or ``unavailable`` keeps them
held. The supervisor runs these effects in one place (``Supervisor._apply``).

The two transient states, ``falling_asleep`` and ``waking``, are each owned by one procedure
(``sleep.py``, ``wake.py``) that returns an outcome; the loop turns the outcome into an event.
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


class Event(str, enum.Enum):
    # probes
    FOUND_AWAKE = "found_awake"
    FOUND_ASLEEP = "found_asleep"
    PROBE_FAILED = "probe_failed"
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

    @property
    def reason(self) -> str:
        """The reason label in logs and metrics: both manual orders are ``manual``."""
        return "manual" if self in (Event.MANUAL_SLEEP, Event.MANUAL_WAKE) else self.value


S, E = State, Event
SLEEP_ORDERS = (E.IDLE, E.MANUAL_SLEEP, E.EVICTION, E.LADDER)
WAKE_ORDERS = (E.REQUEST, E.STUCK, E.MANUAL_WAKE, E.SCHEDULE, E.PREWAKE, E.LADDER)

TRANSITIONS: dict[tuple[State, Event], State] = {
    # starting: hold everything until the engine has been read once
    (S.STARTING, E.FOUND_AWAKE): S.AWAKE,
    (S.STARTING, E.FOUND_ASLEEP): S.ASLEEP,
    (S.STARTING, E.PROBE_FAILED): S.STARTING,
    # awake
    **{(S.AWAKE, order): S.FALLING_ASLEEP for order in SLEEP_ORDERS},
    (S.AWAKE, E.FOUND_AWAKE): S.AWAKE,
    (S.AWAKE, E.FOUND_ASLEEP): S.ASLEEP,        # slept behind our back
    (S.AWAKE, E.PROBE_FAILED): S.UNAVAILABLE,
    (S.AWAKE, E.CHECK_FAILED): S.BROKEN,
    # falling asleep: the sleep procedure reports
    (S.FALLING_ASLEEP, E.SLEPT): S.ASLEEP,
    (S.FALLING_ASLEEP, E.FOUND_ASLEEP): S.ASLEEP,   # read right before /sleep: already asleep
    (S.FALLING_ASLEEP, E.SLEEP_FAILED): S.AWAKE,
    (S.FALLING_ASLEEP, E.DRAIN_TIMEOUT): S.AWAKE,
    (S.FALLING_ASLEEP, E.PROBE_FAILED): S.UNAVAILABLE,
    # asleep
    **{(S.ASLEEP, order): S.WAKING for order in WAKE_ORDERS},
    (S.ASLEEP, E.FOUND_ASLEEP): S.ASLEEP,
    (S.ASLEEP, E.FOUND_AWAKE): S.AWAKE,          # woken behind our back
    (S.ASLEEP, E.PROBE_FAILED): S.UNAVAILABLE,
    (S.ASLEEP, E.RECYCLE): S.UNAVAILABLE,        # the restart command runs; a fresh engine follows
    # waking: the wake procedure reports
    (S.WAKING, E.WOKE): S.AWAKE,
    (S.WAKING, E.FOUND_AWAKE): S.AWAKE,          # a wake call failed, yet the engine is awake
    (S.WAKING, E.WAKE_ABANDONED): S.ASLEEP,
    (S.WAKING, E.NO_GPU_MEMORY): S.ASLEEP,
    (S.WAKING, E.WAKE_FAILED): S.BROKEN,
    (S.WAKING, E.PROBE_FAILED): S.UNAVAILABLE,
    # unavailable: only a probe moves it
    (S.UNAVAILABLE, E.FOUND_AWAKE): S.AWAKE,
    (S.UNAVAILABLE, E.FOUND_ASLEEP): S.ASLEEP,
    (S.UNAVAILABLE, E.PROBE_FAILED): S.UNAVAILABLE,
    # broken: only a restarted engine that answers awake and passes the check
    (S.BROKEN, E.RECOVERED): S.AWAKE,
    (S.BROKEN, E.PROBE_FAILED): S.BROKEN,
    (S.BROKEN, E.FOUND_ASLEEP): S.BROKEN,        # still the zombie
}

# Pairs that never reach the table. Orders are only given where they apply (the loop gives a
# sleep order only while awake, a wake order only while asleep); outcomes come only from the
# procedure that owns their transient state; a broken engine is not believed on a plain
# probe (it must pass the check: RECOVERED); nothing else but the two procedures' outcomes and a
# probe failure can happen while one of them runs.
_ORDERS = set(SLEEP_ORDERS) | set(WAKE_ORDERS) | {E.RECYCLE}
_SLEEP_OUTCOMES = {E.SLEPT, E.SLEEP_FAILED, E.DRAIN_TIMEOUT}
_WAKE_OUTCOMES = {E.WOKE, E.WAKE_ABANDONED, E.NO_GPU_MEMORY, E.WAKE_FAILED}
REFUSED: frozenset[tuple[State, Event]] = frozenset(
    (state, event) for state, event in itertools.product(State, Event)
    if (state, event) not in TRANSITIONS and (
        event in _ORDERS
        or (event in _SLEEP_OUTCOMES and state is not S.FALLING_ASLEEP)
        or (event in _WAKE_OUTCOMES and state is not S.WAKING)
        or (event is E.CHECK_FAILED and state is not S.AWAKE)
        or (event is E.RECOVERED and state is not S.BROKEN)
        or (event is E.FOUND_AWAKE and state in (S.FALLING_ASLEEP, S.BROKEN))
        or (event is E.FOUND_ASLEEP and state is S.WAKING)))

# Effects of entering a state, run by Supervisor._apply after the state has changed.
ON_ENTER: dict[State, tuple[str, ...]] = {
    S.AWAKE: ("release_held",),          # held work goes to the engine, in arrival order
    S.ASLEEP: ("settle_sleep_order",),   # a manual sleep waiting for this answer gets it
    S.BROKEN: ("plan_restart",),         # run the restart command at once, then with backoff
    S.UNAVAILABLE: ("probe_soon",),      # re-read the engine quickly, then backing off
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


if __name__ == "__main__":
    print(table_markdown())
