"""Sleep policy beyond one timer: keep-awake schedules, a sleep ladder, and a learned pre-wake.

Plain code over wall-clock times (epoch seconds) passed in: no I/O but the learner's small state
file. The supervisor asks these objects what is due and acts on the answers.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

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


@dataclass(frozen=True)
class Ladder:
    """``5m:1,2h:2``: level 1 after 5 idle minutes, level 2 after 2 idle hours."""

    rungs: tuple[tuple[float, int], ...]

    @classmethod
    def parse(cls, text: str, parse_duration) -> "Ladder":
        rungs = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            idle, _, level = part.partition(":")
            try:
                rungs.append((parse_duration(idle), int(level)))
            except ValueError:
                raise ValueError(f"{part!r} is not a rung like '5m:1'") from None
        if not rungs:
            raise ValueError("no rungs")
        for (t1, l1), (t2, l2) in zip(rungs, rungs[1:]):
            if not (t2 > t1 and l2 > l1):
                raise ValueError("rungs must go to longer idle times and deeper levels")
        if any(level not in (1, 2) or idle <= 0 for idle, level in rungs):
            raise ValueError("levels are 1 or 2, idle times above zero")
        return cls(tuple(rungs))

    @property
    def first(self) -> tuple[float, int]:
        return self.rungs[0]

    def deeper(self, level: int) -> tuple[float, int] | None:
        """The next rung below ``level``, if any."""
        return next(((idle, l) for idle, l in self.rungs if l > level), None)


@dataclass
class Plan:
    at: float           # epoch seconds
    bucket: str         # "weekday-hour", e.g. "0-9" for Monday 09:xx
    reason: str


@dataclass
class PrewakeLearner:
    """Learns when traffic resumes after a quiet period, by weekday and hour, and plans wakes.

    A bucket is planned once resumptions fell in it in ``min_weeks`` distinct weeks. Each pre-wake
    is judged used (work arrived before the engine slept again) or wasted; a bucket whose last
    two judgements were wasted is not planned until traffic shows up in it again on its own.
    """

    zone: ZoneInfo
    lead: float = 120.0
    min_weeks: int = 2
    keep_weeks: int = 8
    path: Path | None = None
    resumptions: list[float] = field(default_factory=list)
    outcomes: dict[str, list[bool]] = field(default_factory=dict)
    used: int = 0
    wasted: int = 0

    def __post_init__(self) -> None:
        if self.path is not None and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                self.resumptions = [float(t) for t in saved.get("resumptions", [])]
                self.outcomes = {k: [bool(x) for x in v] for k, v in saved.get("outcomes", {}).items()}
                self.used, self.wasted = int(saved.get("used", 0)), int(saved.get("wasted", 0))
            except (OSError, ValueError, TypeError, AttributeError):
                pass   # a damaged state file is forgotten, not fatal

    def bucket(self, when: float) -> str:
        local = datetime.fromtimestamp(when, self.zone)
        return f"{local.weekday()}-{local.hour}"

    def record_resumption(self, when: float, planned_bucket: str | None = None) -> None:
        self.resumptions.append(when)
        horizon = when - self.keep_weeks * 7 * 86400
        self.resumptions = [t for t in self.resumptions if t >= horizon][-5000:]
        bucket = self.bucket(when)
        if bucket != planned_bucket and self.outcomes.get(bucket):
            self.outcomes[bucket].append(True)   # traffic came there unaided: worth planning
        self._save()

    def judge(self, bucket: str, used: bool) -> None:
        self.outcomes.setdefault(bucket, []).append(used)
        self.outcomes[bucket] = self.outcomes[bucket][-6:]
        if used:
            self.used += 1
        else:
            self.wasted += 1
        self._save()

    def _suppressed(self, bucket: str) -> bool:
        recent = self.outcomes.get(bucket, [])[-2:]
        return len(recent) == 2 and not any(recent)

    def plan(self, now: float) -> Plan | None:
        """The next pre-wake after ``now``, or None."""
        by_bucket: dict[str, list[datetime]] = {}
        for t in self.resumptions:
            local = datetime.fromtimestamp(t, self.zone)
            by_bucket.setdefault(f"{local.weekday()}-{local.hour}", []).append(local)
        best = None
        for bucket, seen in by_bucket.items():
            weeks = {d.isocalendar()[:2] for d in seen}
            if len(weeks) < self.min_weeks or self._suppressed(bucket):
                continue
            minute = statistics.median_low(sorted(d.minute for d in seen))
            weekday, hour = map(int, bucket.split("-"))
            local_now = datetime.fromtimestamp(now, self.zone)
            for ahead in range(8):
                day = local_now.date() + timedelta(days=ahead)
                if day.weekday() != weekday:
                    continue
                usual = datetime.combine(day, datetime.min.time(), self.zone) + timedelta(hours=hour, minutes=minute)
                at = usual.timestamp() - self.lead
                if at > now and (best is None or at < best.at):
                    best = Plan(at, bucket, f"traffic usually resumes {DAYS[weekday].title()} "
                                            f"{hour:02d}:{minute:02d} ({len(weeks)} weeks seen)")
                    break
        return best

    def _save(self) -> None:
        if self.path is None:
            return
        temporary = self.path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps({"resumptions": self.resumptions, "outcomes": self.outcomes,
                                             "used": self.used, "wasted": self.wasted}))
            os.replace(temporary, self.path)
        except OSError:
            pass   # the next change tries again; learning goes on in memory
