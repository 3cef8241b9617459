"""The sleep procedure: drain, read the engine, ``/sleep``, learn what it freed; one outcome.

It runs in ``falling_asleep`` (the loop has applied the order) and returns an ``Outcome``; the
loop turns it into the next state. New work is held meanwhile; work in flight finishes first.
"""

from __future__ import annotations

import structlog

from .engine import EngineError, SleepUnsupported
from .states import Event, Outcome


_log = structlog.get_logger("autosleepd.sleep")


def level_for_host_ram(guard, level: int) -> tuple[int | None, str | None]:
    """A level-1 sleep copies the weights into host RAM: with too little, level 2 or none."""
    if guard is None:
        return level, None
    chosen, why = guard.level_for_sleep(level)
    if chosen is None:
        _log.warning("sleep_refused", sleep_level=level, reason=why,
                     hint="AUTOSLEEPD_LEVEL1_FALLBACK=refuse")
    elif chosen != level:
        _log.warning("level1_fallback", from_level=level, to_level=chosen, reason=why)
    return chosen, why


async def fall_asleep(owner, level: int) -> Outcome:
    """``owner`` is the Supervisor: its clock, engine, guard, admission, config and wait."""
    clock, config = owner.clock, owner.config
    started = clock.now()
    drain_end = started + config.drain_timeout
    while owner.admission.in_flight and clock.now() < drain_end and not owner.closing:
        await owner.wait(drain_end)
    if owner.admission.in_flight:
        return Outcome(Event.DRAIN_TIMEOUT, f"{owner.admission.in_flight} requests were still in "
                       f"flight after {config.drain_timeout:g}s", level=level)
    # Read right before /sleep: an engine already asleep must never get a second one (vLLM
    # would abort every request waiting in it).
    sleeping = await owner.prober.read_engine()
    if isinstance(sleeping, EngineError):
        return Outcome(Event.PROBE_FAILED, str(sleeping), level=level)
    if sleeping:
        return Outcome(Event.FOUND_ASLEEP, "the engine was already asleep", level=level)
    if owner.guard is not None:
        await owner.guard.before_sleep()
    try:
        await owner.engine.sleep(level, timeout=config.sleep_timeout)
    except SleepUnsupported as error:
        owner.sleep_unsupported(error)
        return Outcome(Event.SLEEP_FAILED, str(error), level=level)
    except EngineError as error:
        return Outcome(Event.SLEEP_FAILED, str(error), level=level)
    seconds = clock.now() - started
    freed = await owner.guard.after_sleep(level) if owner.guard is not None else None
    return Outcome(Event.SLEPT, level=level, seconds=seconds, freed=freed)
