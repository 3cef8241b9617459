"""Carrying out what a planner planned: a sleep, a (pre-)wake, a ladder step or stop, a recycle.

Ladder steps and recycles need the GPU room of a whole awake engine (a step wakes it for a
moment; a recycle starts a fresh one); without room they are skipped and the planner told.
"""

from __future__ import annotations

import structlog

from .states import Event, State
from .status import Planned

_log = structlog.get_logger("autosleepd.supervisor")


async def carry_out(owner, planned: Planned) -> None:
    """``owner`` is the Supervisor; ``planned`` is due."""
    order = Event(planned.order)
    if order is Event.IDLE:
        await owner.sleep(planned.level, order)
        return
    if order is Event.STOP:
        _log.info("stop", reason=planned.reason)
        await owner.stop()
        _done(owner, planned, owner.state is State.STOPPED)
        return
    if order in (Event.LADDER, Event.RECYCLE):   # both need the GPU room of a full engine
        why = await _no_room(owner)
        if why is not None:
            _done(owner, planned, False)
            _log.warning("ladder_step_skipped" if order is Event.LADDER else "recycle_skipped",
                         to_level=planned.level, reason=why)
            return
    _log.info("prewake" if order in (Event.SCHEDULE, Event.PREWAKE) else order.value, reason=planned.reason)
    if order is Event.RECYCLE:
        _done(owner, planned, True)
        await owner.run_restart(Event.RECYCLE)
        return
    await owner.wake(order, restarts_idle=order is not Event.LADDER)   # a ladder keeps idle time
    if order is Event.LADDER and owner.state is State.AWAKE and owner.admission.idle:
        await owner.sleep(planned.level, Event.LADDER)
    _done(owner, planned, owner.state is (State.ASLEEP if order is Event.LADDER else State.AWAKE))


def _done(owner, planned: Planned, carried_out: bool) -> None:
    if planned.order in ("ladder", "stop"):
        if carried_out:
            owner.stats.ladder_steps += 1
        else:
            owner.stats.ladder_skips += 1
    elif planned.order in ("schedule", "prewake") and carried_out:
        owner.stats.prewakes += 1
    owner.planners.done(planned, carried_out, owner.status())


async def _no_room(owner) -> str | None:
    if owner.guard is None:
        return "the memory guard is off (no NVML), so the room it needs cannot be checked"
    shortfall = await owner.guard.shortfall()
    return shortfall.describe() if shortfall else None
