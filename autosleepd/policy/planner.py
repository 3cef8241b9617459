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

from typing import TYPE_CHECKING

from ..control.status import Planned, Status

if TYPE_CHECKING:
    from ..config import Config


class Planner:
    def plan(self, status: Status) -> Planned | None:
        return None

    def keep_awake_until(self, status: Status) -> tuple[float, str] | None:
        return None

    def observe(self, event: str, status: Status) -> None:
        pass

    def done(self, planned: Planned, carried_out: bool, status: Status) -> None:
        pass


def to_clock(status: Status, wall: float) -> float:
    """An epoch time as clock time."""
    return status.now + (wall - status.wall)


def build_planners(config: Config, learner=None) -> list[Planner]:
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
    if getattr(config, "recycle_residue_growth", 0) or getattr(config, "recycle_after_cycles", 0) \
            or getattr(config, "recycle_after", 0):
        planners.append(RecyclePlanner(config))
    return planners
