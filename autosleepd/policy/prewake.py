"""The learned pre-wake: when traffic usually resumes after a quiet period, by weekday and hour.

Pure code over epoch seconds, but for its small state file.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from ..control.status import Planned, Status
from ..files import write_atomically
from .planner import Planner, to_clock
from .schedule import DAYS

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

    def next_resumption(self, now: float) -> float | None:
        """When traffic usually comes back next after ``now`` (epoch seconds), or None."""
        plan = self.plan(now, lead=0.0)
        return plan.at if plan is not None else None

    def plan(self, now: float, lead: float | None = None) -> Plan | None:
        """The next pre-wake after ``now`` (``lead`` before the usual time), or None."""
        lead = self.lead if lead is None else lead
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
                at = usual.timestamp() - lead
                if at > now and (best is None or at < best.at):
                    best = Plan(at, bucket, f"traffic usually resumes {DAYS[weekday].title()} "
                                            f"{hour:02d}:{minute:02d} ({len(weeks)} weeks seen)")
                    break
        return best

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            write_atomically(self.path, json.dumps({"resumptions": self.resumptions,
                                                    "outcomes": self.outcomes,
                                                    "used": self.used, "wasted": self.wasted}))
        except OSError:
            pass   # the next change tries again; learning goes on in memory


STALE_PLAN = 600.0   # a pre-wake this late (the host was suspended, the clock jumped) is dropped


class PrewakePlanner(Planner):
    """Wake ahead of the usual return of traffic; judge each pre-wake used or wasted."""

    wants_arrivals = True

    def __init__(self, learner: PrewakeLearner, idle_timeout: float):
        self.learner = learner
        self._idle_timeout = idle_timeout
        self._pending: str | None = None   # the slot of a pre-wake not yet judged

    def plan(self, status: Status) -> Planned | None:
        if status.state.value != "asleep":
            return None
        # The first pre-wake since the engine fell asleep: once due, it stays due (unless stale).
        plan = self.learner.plan(max(status.state_since_wall, status.wall - STALE_PLAN))
        if plan is None:
            return None
        return Planned(to_clock(status, plan.at), "prewake", f"pre-wake: {plan.reason}",
                       key=plan.bucket)

    def observe(self, event: str, status: Status) -> None:
        if event == "arrived":
            if not status.in_flight and not status.queued and status.idle_seconds >= self._idle_timeout:
                self.learner.record_resumption(status.wall, self._pending)
            if self._pending is not None:
                self.learner.judge(self._pending, used=True)
                self._pending = None
        elif event == "slept" and self._pending is not None:   # woken for traffic that never came
            self.learner.judge(self._pending, used=False)
            self._pending = None

    def done(self, planned: Planned, carried_out: bool, status: Status) -> None:
        if carried_out:
            self._pending = planned.key
