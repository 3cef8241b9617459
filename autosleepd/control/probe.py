"""Reading the engine's real state, and following it: the probe and its timers.

The probe runs every AUTOSLEEPD_PROBE_INTERVAL, at once after a failure, when the proxy could
not connect (new work is held until it answers), and when forwarded work stalls (an engine slept
behind our back hangs requests, and only a probe can tell). At most one runs at a time: the
control loop runs it. An unreachable engine is re-read with backoff and logged once, then less
and less often. Only a probe's answer moves the state, so nothing flaps.
"""

from __future__ import annotations

import structlog

from .engine import EngineError, EngineTimeout, EngineUnreachable, SleepUnsupported
from .states import Event, State

# Re-reading an unreachable engine: quick at first (a restart is often fast), then every second.
UNREACHABLE_BACKOFF = (0.05, 1.0)
# A stalled request or a failed connect asks for a probe; at most one this often.
CHECK_GAP = 1.0
PROBE_TIMEOUT = 10.0
LOG_BACKOFF_MAX = 300.0


def port_refuses(error) -> bool:
    """The engine's port refuses connections: its process is gone (a slow answer is not)."""
    return isinstance(error, EngineUnreachable) and not isinstance(error, EngineTimeout)


class Prober:
    def __init__(self, owner):
        self._owner = owner
        self._clock = owner.clock
        self._log = structlog.get_logger("autosleepd.probe")
        now = self._clock.now()
        self.next_probe = now         # the periodic (or backed-off) probe
        self.next_check = now         # the earliest an asked-for probe may run
        self.asked = False            # a stall or a failed connect asked for one
        self.gate_closed = False      # a failed connect: new work waits for that probe
        self._delay = UNREACHABLE_BACKOFF[0]
        self._down_since: float | None = None
        self._next_log = 0.0

    def ask(self, hold_work: bool) -> None:
        self.asked = True
        self.gate_closed = self.gate_closed or hold_work

    def soon(self) -> None:
        self.next_probe = min(self.next_probe, self._clock.now() + self._delay)

    async def read_engine(self) -> bool | EngineError:
        """``is_sleeping`` as the engine says it, or the error that kept it from saying."""
        try:
            return await self._owner.engine.is_sleeping(timeout=PROBE_TIMEOUT)
        except SleepUnsupported as error:
            self._owner.sleep_unsupported(error)
            return False
        except EngineError as error:
            return error

    async def level_found(self) -> int:
        """The level an engine found asleep sleeps at, from vLLM's metrics, else a guess."""
        owner = self._owner
        try:
            level = await owner.engine.sleep_level(timeout=PROBE_TIMEOUT)
        except EngineError:
            level = None
        if level is None:
            level = owner.asleep_level or owner.config.sleep_level
            self._log.warning("sleep_level_unknown", assumed_level=level,
                              hint="vLLM has no vllm:engine_sleep_state metric")
        return level

    async def run(self) -> None:
        """Read the engine and follow what it says."""
        owner = self._owner
        asked = self.asked
        sleeping = await self.read_engine()
        self.asked = self.gate_closed = False
        self.next_check = self._clock.now() + CHECK_GAP
        if isinstance(sleeping, EngineError):
            if owner.state is State.STARTING and owner.stop_rung and port_refuses(sleeping):
                owner.apply(Event.FOUND_STOPPED, error=str(sleeping))   # the next request starts it
            if owner.state is State.STOPPED:   # stopped on purpose: nothing to report
                self.next_probe = self._clock.now() + owner.config.probe_interval
                return
            self._unreachable(sleeping)
            owner.apply(Event.PROBE_FAILED, error=str(sleeping))
            return
        self._reachable()
        if owner.state is State.BROKEN:
            await owner.probe_broken(sleeping)
        elif sleeping:
            if owner.state is not State.ASLEEP:
                owner.asleep_level = await self.level_found()
            owner.apply(Event.FOUND_ASLEEP, asked=asked or None)
        else:
            await owner.found_awake()
        if owner.state is State.AWAKE:
            owner.release_held()   # work held while the probe ran

    def _unreachable(self, error: EngineError) -> None:
        now = self._clock.now()
        self._owner.stats.last_error = str(error)
        if self._down_since is None:
            self._down_since, self._next_log = now, now
        if now >= self._next_log:
            waited = now - self._down_since
            self._log.info("engine_unreachable", error=str(error), for_s=round(waited, 1),
                           unreachable=isinstance(error, EngineUnreachable))
            self._next_log = now + min(max(2 * waited, 1.0), LOG_BACKOFF_MAX)
        if self._owner.state is State.BROKEN:
            self._owner.restart_pending = False   # down, so restarting: let it load
        self.next_probe = now + self._delay
        self._delay = min(self._delay * 2, UNREACHABLE_BACKOFF[1])

    def _reachable(self) -> None:
        now = self._clock.now()
        if self._down_since is not None:
            self._log.info("engine_reachable", after_s=round(now - self._down_since, 2))
        self._down_since = None
        self._delay = UNREACHABLE_BACKOFF[0]
        broken = self._owner.state is State.BROKEN
        self.next_probe = now + (UNREACHABLE_BACKOFF[1] if broken else self._owner.config.probe_interval)
