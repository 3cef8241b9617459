"""Keep-awake windows such as ``Mon-Fri 08:00-19:00`` in a time zone: pure code over epoch seconds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from ..control.status import Planned, Status
from .planner import Planner, to_clock

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_WINDOW_RE = re.compile(r"^\s*(?P<days>[A-Za-z*]+(?:-[A-Za-z]+)?)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$")


_DAY_NAMES = {name: i for i, name in enumerate(DAYS)} | {
    name: i for i, name in enumerate(["monday", "tuesday", "wednesday", "thursday", "friday",
                                      "saturday", "sunday"])}


def _day_set(spec: str) -> frozenset[int]:
    spec = spec.lower()
    if spec in ("*", "daily"):
        return frozenset(range(7))
    if "-" in spec:
        first, last = (_DAY_NAMES[part] for part in spec.split("-"))   # KeyError: unknown day
        return frozenset((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset({_DAY_NAMES[spec]})


def _minutes(text: str) -> int:
    hours, minutes = map(int, text.split(":"))
    if not (0 <= hours <= 24 and 0 <= minutes < 60) or hours * 60 + minutes > 24 * 60:
        raise ValueError(text)
    return hours * 60 + minutes


@dataclass(frozen=True)
class Window:
    days: frozenset[int]    # weekday the window starts on, Monday = 0
    start: int              # minutes after midnight
    end: int                # minutes after midnight; at or before start: ends the next day
    text: str

    @property
    def length(self) -> int:
        return (self.end - self.start) % (24 * 60) or 24 * 60


@dataclass(frozen=True)
class Schedule:
    """Keep-awake windows such as ``Mon-Fri 08:00-19:00, Sat 10:00-14:00`` in a time zone."""

    windows: tuple[Window, ...]
    zone: ZoneInfo

    @classmethod
    def parse(cls, text: str, zone: str = "UTC") -> "Schedule":
        """Raises ValueError naming the part that does not parse."""
        windows = []
        for part in (p for p in text.split(",") if p.strip()):
            match = _WINDOW_RE.match(part)
            if not match:
                raise ValueError(f"{part.strip()!r} is not a window like 'Mon-Fri 08:00-19:00'")
            try:
                days = _day_set(match["days"])
                start, end = _minutes(match["start"]), _minutes(match["end"])
            except (ValueError, KeyError):
                raise ValueError(f"{part.strip()!r} has an unknown day or time") from None
            windows.append(Window(days, start, end % (24 * 60), part.strip()))
        return cls(tuple(windows), ZoneInfo(zone))

    def _occurrences(self, around: float):
        """(start, end, window) in epoch seconds, for windows starting from yesterday on."""
        local = datetime.fromtimestamp(around, self.zone)
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        for offset in range(-1, 9):
            day = (midnight + timedelta(days=offset))
            for window in self.windows:
                if day.weekday() in window.days:
                    # Wall-clock arithmetic in the zone, so a window keeps its local hours across
                    # a daylight-saving change.
                    start = datetime.combine(day.date(), datetime.min.time(), self.zone) + timedelta(minutes=window.start)
                    end = start + timedelta(minutes=window.length)
                    yield start.timestamp(), end.timestamp(), window

    def active(self, now: float) -> tuple[Window, float] | None:
        """The window open at ``now`` and when it (or an overlapping one) closes."""
        found = None
        for start, end, window in self._occurrences(now):
            if start <= now < end and (found is None or end > found[1]):
                found = (window, end)
        return found

    def next_start(self, now: float) -> tuple[Window, float] | None:
        starts = [(start, window) for start, _, window in self._occurrences(now) if start > now]
        if not starts:
            return None
        start, window = min(starts, key=lambda item: item[0])
        return window, start


class KeepAwakePlanner(Planner):
    """Never asleep inside a window; woken at each window's start (a pre-wake)."""

    def __init__(self, schedule: Schedule):
        self._schedule = schedule

    def plan(self, status: Status) -> Planned | None:
        if status.state.value != "asleep":
            return None
        # The first window start since the engine fell asleep: once due, it stays due.
        upcoming = self._schedule.next_start(status.state_since_wall)
        if upcoming is None:
            return None
        window, start = upcoming
        return Planned(to_clock(status, start), "schedule",
                       f"wake: a keep-awake window starts ({window.text})")

    def keep_awake_until(self, status: Status) -> tuple[float, str] | None:
        active = self._schedule.active(status.wall)
        if active is None:
            return None
        window, end = active
        return to_clock(status, end), f"the keep-awake window {window.text}"
