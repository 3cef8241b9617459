"""The one owner of the engine's state: it decides, from events and the clock, and nothing else
changes the state (llama-swap #946: a decision taken on a stale view deadlocked).

- What may happen is in ``states.py`` (the table); this file decides *when* and applies it.
- The proxy calls ``admit``/``release`` and reports what it sees (``engine_unreachable``,
  ``stalled``); admin endpoints and neighbours place orders; planners (``policy/``) say what is
  due; the two slow procedures (``sleep.py``, ``wake.py``) return outcomes; the loop (``run``)
  turns each into an event and ``_apply`` moves the state and runs the entry effects.
- Reading (``status``) changes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable, Protocol, Sequence

import structlog

from ..clock import Clock
from ..config import Config
from ..policy.planner import Planner, build_planners
from .admission import Admission, HoldExpired
from .check import Checker
from .engine import EngineError, EngineUnreachable, SleepUnsupported
from .sleep import fall_asleep
from .states import ON_ENTER, SLEEP_ORDERS, Event, Outcome, State, next_state
from .status import Planned, Stats, Status
from .wake import wake

E = Event
# Re-reading an unreachable engine: quick at first (a restart is often fast), then every second.
UNREACHABLE_BACKOFF = (0.05, 1.0)
# A stalled request or a failed connect asks for a probe; at most one this often.
CHECK_GAP = 1.0
RESTART_BACKOFF_MAX = 300.0   # re-running the restart command for an engine still broken
PROBE_TIMEOUT = 10.0


class Engine(Protocol):
    async def is_sleeping(self, timeout: float = ...) -> bool: ...
    async def sleep_level(self, timeout: float = ...) -> int | None: ...
    async def sleep(self, level: int, timeout: float) -> None: ...
    async def wake(self, level: int, timeout: float, on_step=None) -> None: ...
    async def check_inference(self, timeout: float) -> None: ...
    async def fingerprint(self, timeout: float) -> tuple: ...


Restarter = Callable[[], Awaitable[bool]]   # runs the restart command; True if it succeeded


class Observer:
    """What the supervisor reports as it goes; each observer overrides what it needs."""

    def transition(self, old: State, new: State, reason: str, seconds: float) -> None: ...
    def slept(self, level: int, reason: str, seconds: float) -> None: ...
    def woke(self, level: int, reason: str, seconds: float) -> None: ...
    def sleep_failed(self) -> None: ...
    def wake_failed(self) -> None: ...
    def released(self, held_seconds: float) -> None: ...
    def refused_request(self, reason: str) -> None: ...
    def held_abandoned(self) -> None: ...
    def memory_wait(self) -> None: ...
    def restarted(self, ok: bool) -> None: ...


class Refused(Exception):
    """Work that cannot be served, and why; the HTTP edge (proxy/errors.py) maps the reason."""

    REASONS = ("queue_full", "wake_timeout", "shutting_down", "engine_unavailable",
               "no_gpu_memory", "engine_broken")

    def __init__(self, reason: str, message: str, retry_after: float | None = None):
        assert reason in self.REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after   # None: the edge's default for the reason


class OrderFailed(Exception):
    """A manual sleep or wake that could not be carried out."""


@dataclass
class _SleepOrder:
    level: int
    event: Event
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Supervisor:
    def __init__(self, config: Config, engine: Engine, clock: Clock,
                 observers: Sequence[Observer] = (), guard=None, neighbours=None,
                 restart: Restarter | None = None, learner=None,
                 planners: Sequence[Planner] | None = None):
        # what it talks to
        self.config, self.engine, self.clock = config, engine, clock
        self.guard, self.neighbours, self._restart = guard, neighbours, restart
        self._learner = learner
        self._observers = list(observers)
        self.planners = list(planners if planners is not None else build_planners(config, learner))
        self._arrival_listeners = [p for p in self.planners if type(p).observe is not Planner.observe]
        self.checker = Checker(config.wake_check, engine)
        self._log = structlog.get_logger("autosleepd.supervisor")
        # the engine as believed
        self.state = State.STARTING
        self._entered_at = clock.now()
        self.asleep_level: int | None = None
        self.sleep_supported = True
        self.stats = Stats()
        self.cycles = 0                     # sleeps since the engine was (re)started
        self.memory_wait: dict | None = None
        # activity, and the orders waiting for the loop
        self._changed = asyncio.Event()
        self.admission = Admission(clock, self._changed.set, lambda: self.tell("held_abandoned"))
        self._sleep_order: _SleepOrder | None = None
        self._probe_asked = False           # a stall or a failed connect: probe soon
        self._gate_closed = False           # a failed connect: hold new work until that probe
        self.closing = False
        # timers
        self._next_probe = clock.now()
        self._next_check = clock.now()
        self._unreachable_delay = UNREACHABLE_BACKOFF[0]
        self._unreachable_since: float | None = None
        self._next_unreachable_log = 0.0
        self._restart_pending = False
        self._restart_delay = config.restart_backoff
        self._next_restart = clock.now()
        self._recycled = False              # the engine was restarted by a recycle: sleep it again
        self._transitioned = asyncio.Event()

    # ----- the proxy ---------------------------------------------------------------------------

    async def admit(self, until: float | None = None) -> None:
        """Return once this work may reach the engine (counted in flight); raise ``Refused``."""
        if self._arrival_listeners and self.admission.idle:
            snapshot = self.status()
            for planner in self._arrival_listeners:
                planner.observe("arrived", snapshot)
        if self.state is State.AWAKE and not self._gate_closed and not self.closing:
            self.admission.enter()
            return
        if self.closing:
            raise self._refuse("shutting_down", "autosleepd is shutting down")
        if self.admission.queued >= self.config.max_queue:
            raise self._refuse("queue_full", f"{self.admission.queued} requests are already "
                               f"waiting for the engine (AUTOSLEEPD_MAX_QUEUE={self.config.max_queue})")
        deadline = self.clock.now() + self.config.wake_timeout
        try:
            await self.admission.hold(work=True, deadline=deadline if until is None else min(deadline, until))
        except HoldExpired:
            raise self._expired() from None

    def release(self) -> None:
        """Admitted work has ended (last byte sent, or the client went away)."""
        self.admission.leave()

    def engine_unreachable(self, detail: str) -> None:
        """The proxy could not connect: hold work and probe. Only the probe moves the state."""
        self._log.debug("connect_failed", error=detail)
        self._gate_closed = self._probe_asked = True
        self._changed.set()

    def stalled(self) -> None:
        """Forwarded work has had no answer for a while: is the engine asleep behind our back?"""
        if self.state is State.AWAKE and not self._probe_asked:
            self._probe_asked = True
            self._changed.set()

    # ----- orders ------------------------------------------------------------------------------

    async def order_evict(self) -> None:
        """A neighbour needs this GPU's memory: sleep now, but only if idle."""
        if self.state is not State.AWAKE or not self.admission.idle or self._sleep_order:
            raise OrderFailed(f"busy: {self.state.value}, {self.admission.in_flight} in flight, "
                              f"{self.admission.queued} held")
        kept = self._keep_awake(self.status())
        if kept is not None:
            raise OrderFailed(f"kept awake: {kept[1]}")
        await self.order_sleep(self.config.sleep_level, E.EVICTION)

    async def order_sleep(self, level: int, event: Event = E.MANUAL_SLEEP) -> None:
        """Drain, then sleep at ``level``; returns once asleep. Raises ``OrderFailed``."""
        if not self.sleep_supported:
            raise OrderFailed("the engine has no sleep endpoints (is vLLM started with "
                              "VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode?)")
        if self.state is State.ASLEEP:
            if self.asleep_level == level:
                return
            raise OrderFailed(f"the engine already sleeps at level {self.asleep_level}; "
                              "wake it before sleeping at another level")
        if self.state in (State.STARTING, State.UNAVAILABLE, State.BROKEN):
            raise OrderFailed(f"the engine is {self.state.value}")
        if self._sleep_order is not None and self._sleep_order.level != level:
            raise OrderFailed(f"a sleep at level {self._sleep_order.level} is already under way")
        if self._sleep_order is None:
            self._sleep_order = _SleepOrder(level, event)
            self._changed.set()
        await asyncio.shield(self._sleep_order.done)

    async def order_wake(self) -> None:
        """Wake the engine; returns once awake. Raises ``OrderFailed``."""
        if self.state is State.AWAKE:
            return
        try:
            await self.admission.hold(work=False, deadline=self.clock.now() + self.config.wake_timeout)
        except HoldExpired:
            raise OrderFailed(f"the engine did not wake within {self.config.wake_timeout:g}s "
                              f"(state: {self.state.value})") from None

    # ----- reading -----------------------------------------------------------------------------

    @property
    def broken(self) -> bool:
        return self.state is State.BROKEN

    def now(self) -> float:
        return self.clock.now()

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def status(self) -> Status:
        """A snapshot of everything known; computing it changes nothing."""
        now, a, config = self.clock.now(), self.admission, self.config
        memory = self.guard.status() if self.guard is not None else None
        residue = sum(memory["engine_asleep_bytes"].values()) if memory and memory["engine_asleep_bytes"] else None
        learner = self._learner
        snapshot = Status(
            state=self.state, state_seconds=now - self._entered_at,
            sleep_level=self.asleep_level if self.state is State.ASLEEP else config.sleep_level,
            sleep_supported=self.sleep_supported, autosleep=config.autosleep,
            idle_timeout_seconds=config.idle_timeout,
            idle_seconds=0.0 if not a.idle else max(0.0, now - a.last_work_end),
            in_flight=a.in_flight, queued=a.queued, upstream=config.upstream,
            stats=replace(self.stats, config_error=self.checker.config_error),
            waiting_for_memory=(None if self.memory_wait is None else
                                {k: v for k, v in self.memory_wait.items() if k != "text"}),
            memory=memory, residual_bytes=residue, cycles=self.cycles,
            prewakes_used=learner.used if learner else None,
            prewakes_wasted=learner.wasted if learner else None,
            now=now, wall=self.clock.wall())
        return replace(snapshot, next_transition=self._next_plan(snapshot))

    async def wait_for(self, *states: State, timeout: float) -> None:
        """For tests and tooling: wait (real time) until the state is one of ``states``."""
        async with asyncio.timeout(timeout):
            while self.state not in states:
                await self._transitioned.wait()

    async def wait_drained(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.admission.drained.wait()
            return True
        except TimeoutError:
            return False

    # ----- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Decide, act, repeat: every probe, sleep, wake and restart happens here."""
        while not self.closing:
            act, deadline = self._decide()
            if act is None:
                await self.wait(deadline)
            else:
                await act()

    def close(self) -> None:
        """Stop admitting; answer every held request. In-flight work is left to finish."""
        self.closing = True
        self.admission.refuse_all(self._refuse("shutting_down", "autosleepd is shutting down"))
        self._settle_order(OrderFailed("autosleepd is shutting down"))
        self._changed.set()

    def _decide(self):
        """What the loop does next: (coroutine function, None), or (None, when to look again)."""
        now, state = self.clock.now(), self.state
        if state in (State.STARTING, State.UNAVAILABLE, State.BROKEN):
            self._settle_order(OrderFailed(f"the engine is {state.value}"))
            if state is State.BROKEN and self._restart_pending and now >= self._next_restart:
                return self._run_restart, None
            return (self._probe, None) if now >= self._next_probe else (None, self._next_probe)
        if state is State.ASLEEP:
            if self.admission.in_flight:   # work reached it behind our back: wake it at once
                return (lambda: self._wake(E.STUCK)), None
            if self.admission.waiting:
                return (lambda: self._wake(E.REQUEST if self.admission.queued else E.MANUAL_WAKE)), None
            if self._sleep_order is not None:
                self._settle_order(None if self._sleep_order.level == self.asleep_level else
                                   OrderFailed(f"the engine sleeps at level {self.asleep_level}"))
        if state is State.AWAKE:
            if self._probe_asked:
                return (self._probe, None) if now >= self._next_check else (None, self._next_check)
            if self._sleep_order is not None:
                order = self._sleep_order
                return (lambda: self._sleep(order.level, order.event)), None
        planned = self._next_plan(self.status())
        if planned is not None and now >= planned.at:
            return (lambda: self._carry_out(planned)), None
        if now >= self._next_probe:
            return self._probe, None
        return None, self._next_probe if planned is None else min(planned.at, self._next_probe)

    def _next_plan(self, snapshot: Status) -> Planned | None:
        """The earliest plan of every planner; a sleep waits while one keeps the engine awake."""
        plans = [p for p in (planner.plan(snapshot) for planner in self.planners) if p is not None]
        if not plans:
            return None
        planned = min(plans, key=lambda p: p.at)
        kept = self._keep_awake(snapshot) if planned.order == "idle" else None
        if kept is not None and kept[0] > planned.at:
            planned = replace(planned, at=kept[0], reason=f"sleep when {kept[1]} ends")
        return planned

    def _keep_awake(self, snapshot: Status) -> tuple[float, str] | None:
        kept = [k for k in (p.keep_awake_until(snapshot) for p in self.planners) if k is not None]
        return max(kept, key=lambda k: k[0]) if kept else None

    async def _carry_out(self, planned: Planned) -> None:
        order = E(planned.order)
        if order is E.IDLE:
            await self._sleep(planned.level, order)
            return
        if order in (E.LADDER, E.RECYCLE):   # both need the GPU room of a full engine
            why = await self._no_room()
            if why is not None:
                self._planner_done(planned, False)
                self._log.warning("ladder_step_skipped" if order is E.LADDER else "recycle_skipped",
                                  to_level=planned.level, reason=why)
                return
        self._log.info("prewake" if order in (E.SCHEDULE, E.PREWAKE) else order.value,
                       reason=planned.reason)
        if order is E.RECYCLE:
            self._planner_done(planned, True)
            await self._run_restart(E.RECYCLE)
            return
        await self._wake(order, restarts_idle=order is not E.LADDER)   # a ladder keeps idle time
        if order is E.LADDER and self.state is State.AWAKE and self.admission.idle:
            await self._sleep(planned.level, E.LADDER)
        self._planner_done(planned, self.state is (State.ASLEEP if order is E.LADDER else State.AWAKE))

    def _planner_done(self, planned: Planned, carried_out: bool) -> None:
        if planned.order == "ladder":
            if carried_out:
                self.stats.ladder_steps += 1
            else:
                self.stats.ladder_skips += 1
        elif planned.order in ("schedule", "prewake") and carried_out:
            self.stats.prewakes += 1
        snapshot = self.status()
        for planner in self.planners:
            planner.done(planned, carried_out, snapshot)

    async def _no_room(self) -> str | None:
        if self.guard is None:
            return "the memory guard is off (no NVML), so the room it needs cannot be checked"
        shortfall = await self.guard.shortfall()
        return shortfall.describe() if shortfall else None

    # ----- acting: each ends by applying an event -----------------------------------------------

    async def read_engine(self) -> bool | EngineError:
        """``is_sleeping`` as the engine says it, or the error that kept it from saying."""
        try:
            return await self.engine.is_sleeping(timeout=PROBE_TIMEOUT)
        except SleepUnsupported as error:
            self.sleep_unsupported(error)
            return False
        except EngineError as error:
            return error

    async def _probe(self) -> None:
        asked = self._probe_asked
        sleeping = await self.read_engine()
        self._probe_asked = self._gate_closed = False
        self._next_check = self.clock.now() + CHECK_GAP
        if isinstance(sleeping, EngineError):
            self._unreachable(sleeping)
            self._apply(E.PROBE_FAILED, error=str(sleeping))
            return
        self._reachable()
        if self.state is State.BROKEN:
            await self._probe_broken(sleeping)
        elif sleeping:
            if self.state is not State.ASLEEP:
                self.asleep_level = await self._level_found()
            self._apply(E.FOUND_ASLEEP, asked=asked or None)
        else:
            fresh = self.state in (State.STARTING, State.UNAVAILABLE)
            if fresh and not self._recycled:
                self.admission.last_work_end = self.clock.now()   # the idle window starts now
            self._recycled = False
            self._apply(E.FOUND_AWAKE)
            if fresh:
                self.cycles = 0
                if self.guard is not None:
                    await self.guard.learn(awake=True)   # also finds the engine's processes early
                await self.checker.record()
        if self.state is State.AWAKE:
            self._release_held()   # work held while the probe ran

    async def _probe_broken(self, sleeping: bool) -> None:
        """A broken engine recovers only by a restart: a fresh vLLM answers awake and serves."""
        if sleeping:
            self._restart_pending = True    # still the zombie
            self._apply(E.FOUND_ASLEEP)
            return
        self.checker.reference = None       # a fresh engine: its own fingerprint
        failure = await self.checker.verify()
        if failure is not None:
            self._restart_pending = True
            return
        self.stats.broken_reason = None
        self._restart_delay = self.config.restart_backoff
        self.asleep_level = None
        self.cycles = 0
        self.admission.last_work_end = self.clock.now()
        self._apply(E.RECOVERED)

    async def _level_found(self) -> int:
        try:
            level = await self.engine.sleep_level(timeout=PROBE_TIMEOUT)
        except EngineError:
            level = None
        if level is None:
            level = self.asleep_level or self.config.sleep_level
            self._log.warning("sleep_level_unknown", assumed_level=level,
                              hint="vLLM has no vllm:engine_sleep_state metric")
        return level

    async def _sleep(self, level: int, event: Event) -> None:
        if self.guard is not None:
            chosen, why = self.guard.level_for_sleep(level)
            if chosen is None:
                self.admission.last_work_end = self.clock.now()   # ask again after another window
                self._log.warning("sleep_refused", sleep_level=level, reason=why,
                                  hint="AUTOSLEEPD_LEVEL1_FALLBACK=refuse")
                self._settle_order(OrderFailed(f"a level-1 sleep was refused: {why}"))
                return
            if chosen != level:
                self._log.warning("level1_fallback", from_level=level, to_level=chosen, reason=why)
                level = chosen
        self._apply(event, sleep_level=level)
        outcome = await fall_asleep(self, level)
        if outcome.event is E.SLEPT:
            self.asleep_level = level
            self.cycles += 1
            self.stats.sleeps += 1
            self.stats.last_sleep_seconds = round(outcome.seconds, 3)
            if outcome.freed is not None:
                self.stats.gpu_memory_freed_bytes = outcome.freed
            self.tell("slept", level, event.reason, outcome.seconds)
            self._settle_order(None)   # at the level asked for, or the fallback the guard chose
        elif outcome.event is E.FOUND_ASLEEP:
            self.asleep_level = await self._level_found()
        elif outcome.event in (E.SLEEP_FAILED, E.DRAIN_TIMEOUT):
            if outcome.event is E.SLEEP_FAILED:
                self.stats.sleep_failures += 1
                self.stats.last_error = outcome.detail
                self.tell("sleep_failed")
            self.admission.last_work_end = self.clock.now()   # try again after another window
            self._settle_order(OrderFailed(f"the sleep failed: {outcome.detail}"))
        self._apply_outcome(outcome, event)

    async def _wake(self, event: Event, restarts_idle: bool = True) -> None:
        level = self.asleep_level or self.config.sleep_level
        self._apply(event, sleep_level=level)
        outcome = await wake(self, level)
        if outcome.event in (E.WOKE, E.FOUND_AWAKE):
            self.stats.wakes += 1
            self.stats.last_wake_seconds = round(outcome.seconds, 3)
            self.stats.last_engine_wake_seconds = round(outcome.engine_seconds, 4)
            self.asleep_level = None
            if restarts_idle:
                self.admission.last_work_end = self.clock.now()
            self.tell("woke", level, event.reason, outcome.seconds)
        self._apply_outcome(outcome, event)
        if self.state is State.AWAKE and not self.checker.before_release:
            # Beside the released work: it costs them nothing, and a failure still marks broken.
            failure = await self.checker.verify()
            if failure is not None and self.state is State.AWAKE:
                self.stats.check_failures += 1
                self.stats.broken_reason = failure
                self._apply(E.CHECK_FAILED, error=failure)
                return
        if self.state is State.AWAKE and self.guard is not None:
            await self.guard.learn(awake=True)

    async def _run_restart(self, event: Event | None = None) -> None:
        """The restart command: for a broken engine, or (``recycle``) for a drifting asleep one."""
        if event is E.RECYCLE:
            self.stats.recycles += 1
            self._recycled = True
            self._apply(E.RECYCLE)
        self._restart_pending = False
        self.stats.restarts += 1
        ok = await self._restart() if self._restart is not None else False
        self.tell("restarted", ok)
        self._next_restart = self.clock.now() + self._restart_delay
        self._restart_delay = min(self._restart_delay * 2, RESTART_BACKOFF_MAX)
        self._next_probe = self.clock.now()

    def _apply_outcome(self, outcome: Outcome, order: Event) -> None:
        details = {"sleep_level": outcome.level}
        if outcome.detail is not None:
            details["error" if outcome.event not in (E.WOKE, E.SLEPT) else "detail"] = outcome.detail
        if outcome.engine_seconds is not None:
            details["engine_wake_s"] = round(outcome.engine_seconds, 4)
        if outcome.event is E.WAKE_FAILED:
            self.stats.broken_reason = outcome.detail
        self._apply(outcome.event, order=order.reason, **details)

    # ----- the one place the state changes ------------------------------------------------------

    def _apply(self, event: Event, **details) -> None:
        old, new = self.state, next_state(self.state, event)
        if new is old:
            return
        now = self.clock.now()
        seconds, self.state, self._entered_at = now - self._entered_at, new, now
        self._log.info("transition", from_state=old.value, to_state=new.value, reason=event.reason,
                       duration_s=round(seconds, 4),
                       **{k: v for k, v in details.items() if v is not None})
        for effect in ON_ENTER.get(new, ()):
            getattr(self, "_" + effect)()
        self.tell("transition", old, new, event.reason, seconds)
        snapshot = self.status()
        for planner in self.planners:
            planner.observe(event.value, snapshot)
        self._transitioned.set()
        self._transitioned = asyncio.Event()

    # entry effects (states.ON_ENTER)
    def _release_held(self) -> None:
        for waited in self.admission.release_all():
            self.tell("released", waited)

    def _settle_sleep_order(self) -> None:
        if self._sleep_order is not None and self._sleep_order.level == self.asleep_level:
            self._settle_order(None)

    def _plan_restart(self) -> None:
        self._restart_pending = True
        self._next_restart = self.clock.now()
        self._next_probe = self.clock.now() + UNREACHABLE_BACKOFF[1]

    def _probe_soon(self) -> None:
        self._next_probe = min(self._next_probe, self.clock.now() + self._unreachable_delay)

    # ----- small mechanics ----------------------------------------------------------------------

    def tell(self, what: str, *args) -> None:
        for observer in self._observers:
            getattr(observer, what)(*args)

    async def wait(self, deadline: float | None) -> None:
        """Until something changes (work, orders, release) or ``deadline`` (clock time).

        Callers check their condition right before, with no await between, so clearing first
        loses nothing.
        """
        self._changed.clear()
        timer = self.clock.call_at(deadline, self._changed.set) if deadline is not None else None
        try:
            await self._changed.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def note_memory_wait(self, wait: dict | None) -> None:
        if wait is not None and (self.memory_wait is None or self.memory_wait["text"] != wait["text"]):
            self._log.warning("waiting_for_memory", **wait)
        self.memory_wait = wait

    def sleep_unsupported(self, error: EngineError) -> None:
        if self.sleep_supported:
            self.sleep_supported = False
            self.stats.last_error = str(error)
            self._log.error("sleep_unsupported", error=str(error),
                            hint="start vLLM with VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode; "
                                 "autosleepd keeps proxying without sleeping")

    def _unreachable(self, error: EngineError) -> None:
        """Log an unreachable engine once, then less and less often; probe with backoff."""
        now = self.clock.now()
        self.stats.last_error = str(error)
        if self._unreachable_since is None:
            self._unreachable_since, self._next_unreachable_log = now, now
        if now >= self._next_unreachable_log:
            waited = now - self._unreachable_since
            self._log.info("engine_unreachable", error=str(error), for_s=round(waited, 1),
                           unreachable=isinstance(error, EngineUnreachable))
            self._next_unreachable_log = now + min(max(2 * waited, 1.0), 300.0)
        if self.state is State.BROKEN:
            self._restart_pending = False   # down, so restarting (or being restarted): let it load
        self._next_probe = now + self._unreachable_delay
        self._unreachable_delay = min(self._unreachable_delay * 2, UNREACHABLE_BACKOFF[1])

    def _reachable(self) -> None:
        if self._unreachable_since is not None:
            self._log.info("engine_reachable",
                           after_s=round(self.clock.now() - self._unreachable_since, 2))
        self._unreachable_since = None
        self._unreachable_delay = UNREACHABLE_BACKOFF[0]
        self._next_probe = self.clock.now() + (self.config.probe_interval
                                               if self.state is not State.BROKEN else UNREACHABLE_BACKOFF[1])

    def _expired(self) -> Refused:
        """Why a held request's deadline passed, as the refusal it gets."""
        config = self.config
        if self.memory_wait is not None:
            return self._refuse("no_gpu_memory", "not enough GPU memory to wake the engine within "
                                f"{config.wake_timeout:g}s: {self.memory_wait['text']}")
        if self.state is State.BROKEN:
            return self._refuse("engine_broken", "the engine is broken (a wake failed: "
                                f"{self.stats.broken_reason}); it needs a restart")
        if self.state in (State.STARTING, State.UNAVAILABLE):
            return self._refuse("engine_unavailable", f"the engine did not answer within "
                                f"{config.wake_timeout:g}s")
        # Retry-After from what the wake is expected to take still (the last one's duration).
        expected = self.stats.last_wake_seconds
        left = None
        if self.state is State.WAKING and expected is not None:
            left = max(1.0, expected - (self.clock.now() - self._entered_at))
        return self._refuse("wake_timeout", f"the engine did not wake within {config.wake_timeout:g}s "
                            f"(state: {self.state.value}); the wake goes on", retry_after=left)

    def _refuse(self, reason: str, message: str, retry_after: float | None = None) -> Refused:
        self.tell("refused_request", reason)
        return Refused(reason, message, retry_after)

    def _settle_order(self, error: Exception | None) -> None:
        order, self._sleep_order = self._sleep_order, None
        if order is None or order.done.done():
            return
        if error is None:
            order.done.set_result(None)
        else:
            order.done.set_exception(error)
