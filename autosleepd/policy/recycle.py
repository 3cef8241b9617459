"""Recycling: restart an engine while it sleeps, before its leftover memory makes a wake fail.

vLLM #36651: the memory an engine keeps while asleep grew from 412 MiB to 5.2 GiB over a day of
cycles, and then every wake failed out of memory. This planner watches the memory left at each
sleep and plans a restart, while asleep and with nothing held, when it grew past
AUTOSLEEPD_RECYCLE_RESIDUE_GROWTH over the first cycle's, or after AUTOSLEEPD_RECYCLE_AFTER_CYCLES
sleeps, or once the engine is older than AUTOSLEEPD_RECYCLE_AFTER.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..control.status import Planned, Status
from ..gpu.readers import GiB
from .planner import Planner

if TYPE_CHECKING:
    from ..config import Config



class RecyclePlanner(Planner):
    def __init__(self, config: Config):
        self._growth = config.recycle_residue_growth
        self._cycles = config.recycle_after_cycles
        self._age = config.recycle_after
        self._first_residue: int | None = None   # the memory left at the first sleep
        self._born: float | None = None          # clock time the engine was first seen up

    def plan(self, status: Status) -> Planned | None:
        if status.state.value != "asleep" or status.queued or status.in_flight:
            return None
        residue = status.residual_bytes
        if self._growth and residue is not None and self._first_residue is not None \
                and residue - self._first_residue > self._growth:
            return Planned(status.now, "recycle",
                           f"recycle: asleep it keeps {residue / GiB:.2f} GiB, "
                           f"{(residue - self._first_residue) / GiB:.2f} GiB more than at its first sleep")
        if self._cycles and status.cycles >= self._cycles:
            return Planned(status.now, "recycle", f"recycle: {status.cycles} sleep cycles")
        if self._age and self._born is not None:
            return Planned(self._born + self._age, "recycle",
                           f"recycle: the engine has run {self._age:g}s")
        return None

    def observe(self, event: str, status: Status) -> None:
        if event == "slept" and self._first_residue is None:
            self._first_residue = status.residual_bytes
        elif event in ("recycle", "recovered") or (event in ("found_awake", "found_asleep") and self._born is None):
            self._first_residue = None   # a fresh engine: start counting again
            self._born = status.now
