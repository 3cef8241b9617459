"""The sleep ladder: deeper sleep levels after longer idle times, and maybe a stop at the end."""

from __future__ import annotations

from dataclasses import dataclass

from ..control.status import Planned, Status
from .planner import Planner


@dataclass(frozen=True)
class Ladder:
    """``5m:1,2h:2,12h:stop``: level 1 after 5 idle minutes, level 2 after 2 idle hours, the
    engine's process stopped after 12 idle hours."""

    rungs: tuple[tuple[float, int], ...]
    stop_after: float | None = None      # idle seconds before the stop rung; None: no stop rung

    @classmethod
    def parse(cls, text: str, parse_duration) -> "Ladder":
        rungs, stop_after = [], None
        parts = [p.strip() for p in text.split(",")]
        if any(not part for part in parts):
            raise ValueError("an empty rung (two commas, or one at an end): rungs are like '5m:1'")
        for part in parts:
            idle, _, level = part.partition(":")
            if stop_after is not None:
                raise ValueError("'stop' can only be the last rung")
            try:
                if level.strip().lower() == "stop":
                    stop_after = parse_duration(idle)
                    continue
                rungs.append((parse_duration(idle), int(level)))
            except ValueError:
                raise ValueError(f"{part!r} is not a rung like '5m:1' or '12h:stop'") from None
        if not rungs:
            raise ValueError("no sleep rung" + (" before 'stop'" if stop_after is not None else ""))
        if stop_after is not None and stop_after <= rungs[-1][0]:
            raise ValueError("the stop rung must come after a longer idle time than the last sleep")
        for (t1, l1), (t2, l2) in zip(rungs, rungs[1:]):
            if not (t2 > t1 and l2 > l1):
                raise ValueError("rungs must go to longer idle times and deeper levels")
        if any(level not in (1, 2) or idle <= 0 for idle, level in rungs):
            raise ValueError("levels are 1 or 2, idle times above zero")
        return cls(tuple(rungs), stop_after)

    @property
    def first(self) -> tuple[float, int]:
        return self.rungs[0]

    def deeper(self, level: int) -> tuple[float, int] | None:
        """The next rung below ``level``, if any."""
        return next(((idle, l) for idle, l in self.rungs if l > level), None)


# A step skipped for want of GPU memory, or a stop that failed, is tried again this much later.
LADDER_RETRY = 300.0


class LadderPlanner(Planner):
    """Deepen a sleep after longer idle times: each step wakes the engine, then sleeps deeper;
    from the deepest sleep, the stop rung stops the engine (no wake needed)."""

    def __init__(self, ladder: Ladder, first_level: int):
        self._ladder = ladder
        self._first_level = first_level
        self._retry_at = {"ladder": 0.0, "stop": 0.0}   # by order: not carried out, try later

    def plan(self, status: Status) -> Planned | None:
        if status.state.value != "asleep" or status.queued or status.in_flight:
            return None
        stop = None
        if self._ladder.stop_after is not None:
            stop_after = self._ladder.stop_after
            stop = Planned(max(status.last_work_end + stop_after, self._retry_at["stop"]), "stop",
                           f"stop the engine's process: idle {stop_after:g}s")
        deeper = self._ladder.deeper(status.sleep_level)
        if deeper is None:
            return stop
        idle, level = deeper
        step = Planned(max(status.last_work_end + idle, self._retry_at["ladder"]), "ladder",
                       f"sleep deeper, level {level}: idle {idle:g}s", level=level)
        # A step skipped for want of GPU room (or of a memory guard) must not keep the engine
        # from the stop rung, which needs no room at all.
        return stop if stop is not None and stop.at <= step.at else step

    def done(self, planned: Planned, carried_out: bool, status: Status) -> None:
        if not carried_out and planned.order in self._retry_at:
            self._retry_at[planned.order] = status.now + LADDER_RETRY
