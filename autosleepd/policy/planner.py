"""The one interface every sleep policy answers, and the list of policies a configuration runs.

A planner answers from the status snapshot and the clock, and never acts or logs:
- ``plan``: its next transition (``Planned``: when, which order, why), or None;
- ``keep_awake_until``: a time before which no sleep may happen, and why (keep-awake windows);
- ``observe``: every event the supervisor applies (and ``arrived`` for work), to learn from;
- ``done``: what became of its last plan (carried out, or skipped for want of GPU memory).

Adding a policy is one module with a ``Planner`` subclass, one line in ``build_planners``, and
its configuration, metrics and README section.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..control.status import Planned, Status

if TYPE_CHECKING:
    from ..config import Config


class Planner:
    wants_arrivals = False   # observe("arrived") on work after idle: costs the proxy a snapshot

    def plan(self, status: Status) -> Planned | None:
        return None

    def keep_awake_until(self, status: Status) -> tuple[float, str] | None:
        return None

    def observe(self, event: str, status: Status) -> None:
        pass

    def done(self, planned: Planned, carried_out: bool, status: Status) -> None:
        pass


class Planners:
    """Every planner of a configuration, asked as one."""

    def __init__(self, planners: list[Planner]):
        self.all = planners
        self.learn_from_arrivals = any(p.wants_arrivals for p in planners)

    def add(self, planner: Planner) -> None:
        self.all.append(planner)
        self.learn_from_arrivals = self.learn_from_arrivals or planner.wants_arrivals

    def next(self, status: Status) -> Planned | None:
        """The earliest plan; a sleep waits while any planner keeps the engine awake."""
        plans = [p for p in (planner.plan(status) for planner in self.all) if p is not None]
        if not plans:
            return None
        planned = min(plans, key=lambda p: p.at)
        kept = self.keep_awake_until(status) if planned.order == "idle" else None
        if kept is not None and kept[0] > planned.at:
            planned = replace(planned, at=kept[0], reason=f"sleep when {kept[1]} ends")
        return planned

    def keep_awake_until(self, status: Status) -> tuple[float, str] | None:
        kept = [k for k in (p.keep_awake_until(status) for p in self.all) if k is not None]
        return max(kept, key=lambda k: k[0]) if kept else None

    def observe(self, event: str, status: Status) -> None:
        for planner in self.all:
            if event != "arrived" or planner.wants_arrivals:
                planner.observe(event, status)

    def done(self, planned: Planned, carried_out: bool, status: Status) -> None:
        for planner in self.all:
            planner.done(planned, carried_out, status)


def to_clock(status: Status, wall: float) -> float:
    """An epoch time as clock time."""
    return status.now + (wall - status.wall)


def build_planners(config: Config, learner=None) -> Planners:
    from .idle import IdlePlanner
    from .ladder import LadderPlanner
    from .prewake import PrewakePlanner
    from .recycle import RecyclePlanner
    from .schedule import KeepAwakePlanner

    planners: list[Planner] = [IdlePlanner(config)]
    if config.keep_awake is not None:
        planners.append(KeepAwakePlanner(config.keep_awake))
    if learner is not None:
        planners.append(PrewakePlanner(learner, config.idle_timeout))
    if config.ladder is not None:
        planners.append(LadderPlanner(config.ladder, config.sleep_level))
    if config.recycling:
        planners.append(RecyclePlanner(config))
    return Planners(planners)
