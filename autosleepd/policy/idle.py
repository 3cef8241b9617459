"""The idle timer: sleep once nothing has been in flight or held for the idle window."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..control.status import Planned, Status
from .planner import Planner

if TYPE_CHECKING:
    from ..config import Config


class IdlePlanner(Planner):
    def __init__(self, config: Config):
        self._timeout = config.idle_timeout
        self._level = config.sleep_level
        self._what = ("sleep at the level auto chooses then" if config.sleep_level_auto
                      else f"sleep at level {config.sleep_level}")

    def plan(self, status: Status) -> Planned | None:
        if (status.state.value != "awake" or not status.autosleep or not status.sleep_supported
                or status.in_flight or status.queued):
            return None
        return Planned(status.last_work_end + self._timeout, "idle",
                       f"{self._what}: idle {self._timeout:g}s", level=self._level)
