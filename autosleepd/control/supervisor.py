"""The one owner of the engine's state: it decides, from events and the clock, and nothing else
changes the state (llama-swap #946: a decision taken on a stale view deadlocked).

- What may happen is in ``states.py`` (the table); this file decides *when* and applies it.
- The proxy calls ``admit``/``release`` and reports what it sees (``engine_unreachable``,
  ``stalled``); admin endpoints and neighbours place orders; planners (``policy/``) say what is
  due; the slow procedures (``sleep.py``, ``wake.py``, ``stop.py``) return outcomes; the loop (``run``)
  turns each into an event and ``_apply`` moves the state and runs the entry effects.
- Reading (``status``) changes nothing.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import structlog

from ..clock import Clock
from ..config import Config
from ..policy.pin import PinPlanner
from ..policy.level import LevelInputs, LevelTimes, choose_level
from ..policy.planner import build_planners
from .admission import Admission, HoldExpired, why_expired
from .check import Checker
from .engine import EngineError
from .interfaces import Engine, Observer, OrderFailed, Refused, Restarter
from .probe import CHECK_GAP, UNREACHABLE_BACKOFF, Prober
from .sleep import fall_asleep, level_for_host_ram
from .states import ON_ENTER, Event, Outcome, State, next_state
from .status import Stats, Status
from .planned import carry_out
from .stop import start_engine, stop_engine
from .wake import wake_engine

RESTART_BACKOFF_MAX = 300.0   # re-running the restart command for an engine still broken


@dataclass
class _SleepOrder:
    level: int
    event: Event
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Supervisor:
    def __init__(self, config: Config, engine: Engine, clock: Clock,
                 observers: Sequence[Observer] = (), guard=None, neighbours=None,
                 restart: Restarter | None = None, learner=None):
        # what it talks to
        self.config, self.engine, self.clock = config, engine, clock
        self.guard, self.neighbours, self._restart = guard, neighbours, restart
        self._learner = learner
        self.power = None                   # the GPU power meter (gpu/power.py), when NVML is there
        self._observers = list(observers)
        self.planners = build_planners(config, learner)
        self.pins = PinPlanner(config.keep_alive_max)   # pins and keep-alives: a planner's input
        self.planners.add(self.pins)
        self.checker = Checker(config.wake_check, engine)
        # On a host of several engines every line says whose it is: the supervisor's own lines
        # through this logger, the procedures' lines through the control loop's context (run).
        self._named = {"engine": config.engine_name} if len(config.engines) > 1 else {}
        self._log = structlog.get_logger("autosleepd.supervisor", **self._named)
        # the engine as believed
        self.state = State.STARTING
        self._entered_at = clock.now()
        self.asleep_level: int | None = None
        self.sleep_supported = True
        self.stats = Stats()
        self.cycles = 0                     # sleeps since the engine was (re)started
        self.level_times = LevelTimes()     # measured sleeps and wakes, for AUTOSLEEPD_SLEEP_LEVEL=auto
        self.level_choice: dict | None = None   # the last level auto chose, and why
        self.memory_wait: dict | None = None
        # activity, and the orders waiting for the loop
        self._changed = asyncio.Event()
        self.admission = Admission(clock, self._changed.set, lambda: self.tell("held_abandoned"),
                                   on_drained=self._drained)
        self._looks_by: float | None = None   # while the loop waits idle: when it looks again
        self._sleep_order: _SleepOrder | None = None
        self.closing = False
        # timers
        self.prober = Prober(self)
        self.restart_pending = False
        self._restart_delay = config.restart_backoff
        self._next_restart = clock.now()
        self._recycled = False              # the engine was restarted by a recycle: sleep it again
        self._start_delay = config.restart_backoff   # after a failed start, before the next; doubles
        self._next_start = clock.now()
        self._transitioned = asyncio.Event()

    # ----- the proxy ---------------------------------------------------------------------------

    def try_admit(self) -> bool:
        """Admit this work now if the engine is awake (it is then counted in flight); False:
        ``admit`` must wait. The proxy's fast path: no task, no await."""
        if self.state is State.AWAKE and not self.prober.gate_closed and not self.closing:
            self._arrived()
            self.admission.enter()
            return True
        return False

    async def admit(self, until: float | None = None) -> None:
        """Return once this work may reach the engine (counted in flight); raise ``Refused``."""
        if self.try_admit():
            return
        self._arrived()
        if self.closing:
            raise self._refuse("shutting_down", "autosleepd is shutting down")
        refused = self._start_backoff()
        if refused is not None:
            raise refused
        if self.admission.queued >= self.config.max_queue:
            raise self._refuse("queue_full", f"{self.admission.queued} requests are already "
                               f"waiting for the engine (AUTOSLEEPD_MAX_QUEUE={self.config.max_queue})")
        deadline = self.clock.now() + self.config.wake_timeout
        try:
            await self.admission.hold(work=True, deadline=deadline if until is None else min(deadline, until))
        except HoldExpired:
            raise self._expired() from None

    def _drained(self) -> None:
        """In flight reached 0. The loop must look at once, unless it is awake and waiting, and
        looks again anyway before the idle window that starts now can end: no plan that work's
        end starts is due sooner. At one connection this spares a loop turn per request."""
        looks_by = self._looks_by
        if (looks_by is None or self.state is not State.AWAKE
                or looks_by > self.clock.now() + self.config.idle_timeout):
            self._changed.set()

    def _arrived(self) -> None:
        if self.planners.learn_from_arrivals and self.admission.idle:
            self.planners.observe("arrived", self.status())

    def release(self) -> None:
        """Admitted work has ended (last byte sent, or the client went away)."""
        self.admission.leave()

    def engine_unreachable(self, detail: str) -> None:
        """The proxy could not connect: hold work and probe. Only the probe moves the state."""
        self._log.debug("connect_failed", error=detail)
        self.prober.ask(hold_work=True)
        self.share_admission()
        self._changed.set()

    def stalled(self) -> None:
        """Forwarded work has had no answer for a while: is the engine asleep behind our back?"""
        if self.state is State.AWAKE and not self.prober.asked:
            self.prober.ask(hold_work=False)
            self._changed.set()

    # ----- orders ------------------------------------------------------------------------------

    async def order_evict(self) -> None:
        """A neighbour needs this GPU's memory: sleep now, but only if idle."""
        if self.state is not State.AWAKE or not self.admission.idle or self._sleep_order:
            raise OrderFailed(f"busy: {self.state.value}, {self.admission.in_flight} in flight, "
                              f"{self.admission.queued} held")
        kept = self.planners.keep_awake_until(self.status())
        if kept is not None:
            raise OrderFailed(f"kept awake: {kept[1]}")
        await self.order_sleep(self.config.sleep_level, Event.EVICTION)

    async def order_sleep(self, level: int, event: Event = Event.MANUAL_SLEEP) -> None:
        """Drain, then sleep at ``level``; returns once asleep. Raises ``OrderFailed``."""
        if not self.sleep_supported:
            raise OrderFailed("the engine has no sleep endpoints (is vLLM started with "
                              "VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode?)")
        if self.state is State.ASLEEP:
            if self.asleep_level == level:
                return
            raise OrderFailed(f"the engine already sleeps at level {self.asleep_level}; "
                              "wake it before sleeping at another level")
        if self.state in (State.STARTING, State.UNAVAILABLE, State.BROKEN, State.STOPPED):
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
        refused = self._start_backoff()
        if refused is not None:
            raise OrderFailed(refused.message)
        try:
            await self.admission.hold(work=False, deadline=self.clock.now() + self.config.wake_timeout)
        except HoldExpired:
            raise OrderFailed(f"the engine did not wake within {self.config.wake_timeout:g}s "
                              f"(state: {self.state.value})") from None

    def pin(self, seconds: float | None) -> None:
        """Keep the engine awake for ``seconds`` (None: until unpinned); wakes it if asleep."""
        self.pins.pin(self.clock.now(), self.clock.wall(), seconds)
        self._log.info("pinned", seconds=seconds)
        self._changed.set()

    def unpin(self) -> None:
        self.pins.unpin()
        self._log.info("unpinned")
        self._changed.set()

    def keep_alive(self, seconds: float) -> None:
        """A request asked for a longer idle window (bounded by AUTOSLEEPD_KEEP_ALIVE_MAX)."""
        self.pins.ask_keep_alive(seconds)

    # ----- reading -----------------------------------------------------------------------------

    @property
    def broken(self) -> bool:
        return self.state is State.BROKEN

    @property
    def stop_rung(self) -> bool:
        return self.config.ladder is not None and self.config.ladder.stop_after is not None

    def now(self) -> float:
        return self.clock.now()

    def idle_seconds(self) -> float:
        """Since the last work ended; 0 while any is in flight or held."""
        a = self.admission
        return max(0.0, self.clock.now() - a.last_work_end) if a.idle else 0.0

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def status(self) -> Status:
        """A snapshot of everything known; computing it changes nothing."""
        now, a, config = self.clock.now(), self.admission, self.config
        memory = self.guard.status() if self.guard is not None else None
        asleep = memory["engine_asleep_bytes"] if memory else None
        residue = sum(asleep.values()) if asleep else None
        learner = self._learner
        snapshot = Status(
            state=self.state, state_seconds=now - self._entered_at,
            sleep_level=self.asleep_level if self.state is State.ASLEEP else config.sleep_level,
            sleep_supported=self.sleep_supported, autosleep=config.autosleep,
            idle_timeout_seconds=config.idle_timeout,
            idle_seconds=self.idle_seconds(),
            in_flight=a.in_flight, queued=a.queued, upstream=config.upstream,
            stats=replace(self.stats, config_error=self.checker.config_error),
            waiting_for_memory=(None if self.memory_wait is None else
                                {k: v for k, v in self.memory_wait.items() if k != "text"}),
            memory=memory, residual_bytes=residue, cycles=self.cycles,
            power=self.power.status() if self.power is not None else None,
            level_auto=({"last_choice": self.level_choice, "times": self.level_times.as_dict()}
                        if config.sleep_level_auto else None),
            prewakes_used=learner.used if learner else None,
            prewakes_wasted=learner.wasted if learner else None,
            now=now, wall=self.clock.wall())
        return replace(snapshot, next_transition=self.planners.next(snapshot))

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
        structlog.contextvars.bind_contextvars(**self._named)   # this task and what it starts
        while not self.closing:
            self.share_admission()   # a probe may have reopened the gate
            act, deadline = self._decide()
            if act is None:
                self._looks_by = math.inf if deadline is None else deadline
                try:
                    await self.wait(deadline)
                finally:
                    self._looks_by = None
            else:
                await act()

    def close(self) -> None:
        """Stop admitting; answer every held request. In-flight work is left to finish."""
        self.closing = True
        self.share_admission()
        self.admission.refuse_all(self._refuse("shutting_down", "autosleepd is shutting down"))
        self._settle_order(OrderFailed("autosleepd is shutting down"))
        self._changed.set()

    def _decide(self):
        """What the loop does next: (coroutine function, None), or (None, when to look again)."""
        now, state = self.clock.now(), self.state
        if state is State.STOPPED:
            return self._decide_stopped(now)
        if state in (State.STARTING, State.UNAVAILABLE, State.BROKEN):
            self._settle_order(OrderFailed(f"the engine is {state.value}"))
            if state is State.BROKEN and self.restart_pending and now >= self._next_restart:
                return self.run_restart, None
            at = self.prober.next_probe
            return (self.prober.run, None) if now >= at else (None, at)
        if state is State.ASLEEP:
            if self.admission.in_flight:   # work reached it behind our back: wake it at once
                return (lambda: self.wake(Event.STUCK)), None
            if self.admission.waiting:
                why = Event.REQUEST if self.admission.queued else Event.MANUAL_WAKE
                return (lambda: self.wake(why)), None
            if self._sleep_order is not None:
                self._settle_order(None if self._sleep_order.level == self.asleep_level else
                                   OrderFailed(f"the engine sleeps at level {self.asleep_level}"))
        if state is State.AWAKE:
            if self.prober.asked:
                at = self.prober.next_check
                return (self.prober.run, None) if now >= at else (None, at)
            if self._sleep_order is not None:
                order = self._sleep_order
                return (lambda: self.sleep(order.level, order.event)), None
        snapshot = self.status()   # planners answer in its clock time: judge due by it too
        planned = snapshot.next_transition
        if planned is not None and snapshot.now >= planned.at:
            return (lambda: carry_out(self, planned)), None
        at = self.prober.next_probe
        if now >= at:
            return self.prober.run, None
        return None, at if planned is None else min(planned.at, at)

    def _decide_stopped(self, now: float):
        self._settle_order(OrderFailed("the engine is stopped (the ladder's stop rung); a request "
                                       "or a wake starts it"))
        self.prober.asked = self.prober.gate_closed = False   # a closed port is expected here
        if self.admission.waiting and now >= self._next_start:
            why = Event.REQUEST if self.admission.queued else Event.MANUAL_WAKE
            return (lambda: self.launch(why)), None
        at = self.prober.next_probe
        if now >= at:
            return self.prober.run, None
        return None, min(at, self._next_start) if self.admission.waiting else at

    def _start_backoff(self) -> Refused | None:
        """After a failed start, work is refused at once until the next start may be tried."""
        if self.state is not State.STOPPED or self.stats.start_failure is None:
            return None
        left = self._next_start - self.clock.now()
        if left <= 0:
            return None
        return self._refuse("engine_start_failed", "the engine is stopped and its last start "
                            f"failed: {self.stats.start_failure}; the next start is tried in "
                            f"{left:.0f}s", retry_after=left)

    # ----- acting: each ends by applying an event -----------------------------------------------

    async def found_awake(self) -> None:
        """The probe found the engine awake (a fresh one, or one woken behind our back)."""
        fresh = self.state in (State.STARTING, State.UNAVAILABLE, State.STOPPED)
        if fresh and not self._recycled:
            self.admission.last_work_end = self.clock.now()   # the idle window starts now
        self._recycled = False   # a recycled engine goes back to sleep at once
        self.apply(Event.FOUND_AWAKE)
        if fresh:
            self.cycles = 0
            if self.guard is not None:
                await self.guard.learn(awake=True)   # also finds the engine's processes early
            await self.checker.record()

    async def probe_broken(self, sleeping: bool) -> None:
        """A broken engine recovers only by a restart: a fresh vLLM answers awake and serves."""
        if sleeping:
            self.restart_pending = True    # still the zombie
            self.apply(Event.FOUND_ASLEEP)
            return
        self.checker.reference = None      # a fresh engine: verify() records its fingerprint
        failure = await self.checker.verify()
        if failure is not None:
            self.restart_pending = True
            return
        self.stats.broken_reason = None
        self._restart_delay = self.config.restart_backoff
        self.asleep_level = None
        self.cycles = 0
        self.admission.last_work_end = self.clock.now()
        self.apply(Event.RECOVERED)

    async def sleep(self, level: int, event: Event) -> None:
        if self.config.sleep_level_auto and event is Event.IDLE:
            level = self._choose_level()
            if level is None:
                self.admission.last_work_end = self.clock.now()   # ask again after another window
                return
        chosen, refused = level_for_host_ram(self.guard, level)
        if chosen is None:
            self.admission.last_work_end = self.clock.now()   # ask again after another window
            self._settle_order(OrderFailed(f"a level-1 sleep was refused: {refused}"))
            return
        level = chosen
        self.apply(event, sleep_level=level)
        outcome = await fall_asleep(self, level)
        self.stats.record(outcome)
        if outcome.event is Event.SLEPT:
            self.asleep_level = level
            self.level_times.record_sleep(level, outcome.seconds)
            self.cycles += 1
            self.tell("slept", level, event.reason, outcome.seconds)
            self._settle_order(None)   # at the level asked for, or the fallback the guard chose
        elif outcome.event is Event.FOUND_ASLEEP:
            self.asleep_level = await self.prober.level_found()
        elif outcome.event in (Event.SLEEP_FAILED, Event.DRAIN_TIMEOUT):
            if outcome.event is Event.SLEEP_FAILED:
                self.tell("sleep_failed")
            self.admission.last_work_end = self.clock.now()   # try again after another window
            self._settle_order(OrderFailed(f"the sleep failed: {outcome.detail}"))
        self._apply_outcome(outcome, event)

    def _choose_level(self) -> int | None:
        """AUTOSLEEPD_SLEEP_LEVEL=auto: the level of this idle sleep (policy/level.py), logged."""
        resumes_in = None
        if self._learner is not None:
            wall = self.clock.wall()
            resumes = self._learner.next_resumption(wall)
            resumes_in = None if resumes is None else resumes - wall
        available, weights = self.guard.host_ram() if self.guard is not None else (None, None)
        inputs = LevelInputs(self.level_times, self.idle_seconds(), resumes_in, available, weights,
                             self.config.wake_memory_margin)
        choice = choose_level(inputs)
        self._log.info("level_chosen", sleep_level=choice.level, reason=choice.reason, **inputs.as_log())
        self.level_choice = {"level": choice.level, "reason": choice.reason}
        return choice.level

    async def wake(self, event: Event, restarts_idle: bool = True) -> None:
        level = self.asleep_level or self.config.sleep_level
        self.apply(event, sleep_level=level)
        outcome = await wake_engine(self, level)
        self.stats.record(outcome)
        if outcome.event in (Event.WOKE, Event.FOUND_AWAKE):
            self.asleep_level = None
            if outcome.event is Event.WOKE:
                self.level_times.record_wake(level, outcome.engine_seconds)
            if restarts_idle:
                self.admission.last_work_end = self.clock.now()
            self.tell("woke", level, event.reason, outcome.seconds)
        self._apply_outcome(outcome, event)
        if self.state is State.AWAKE and not self.checker.before_release:
            # Beside the released work: it costs them nothing, and a failure still marks broken.
            failure = await self._check_after_wake()
            if failure is not None and self.state is State.AWAKE and await self._slept_by_hand():
                return   # a sleep behind our back failed the check: asleep, not broken
            if failure is not None and self.state is State.AWAKE:
                self.stats.check_failures += 1
                self.stats.broken_reason = failure
                self.apply(Event.CHECK_FAILED, error=failure)
                return
        if self.state is State.AWAKE and self.guard is not None:
            await self.guard.learn(awake=True)

    async def _check_after_wake(self) -> str | None:
        """The wake check, with the engine's state read every CHECK_GAP while it runs: one slept
        by hand meanwhile hangs the check (and this loop, and the work stalled on it) until the
        check's timeout; found asleep, the check is given up."""
        check = asyncio.ensure_future(self.checker.verify())
        try:
            while True:
                tick = asyncio.get_running_loop().create_future()
                timer = self.clock.call_at(self.clock.now() + CHECK_GAP,
                                           lambda: tick.done() or tick.set_result(None))
                try:
                    await asyncio.wait({check, tick}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    timer.cancel()
                if check.done():
                    return check.result()
                if await self.prober.read_engine() is True:
                    return "the engine was found asleep during the check"
        finally:
            check.cancel()

    async def _slept_by_hand(self) -> bool:
        """The check after a wake failed: found asleep if it was slept meanwhile (an operator's
        curl /sleep hangs or aborts the check), so the work stalled on it is woken for again."""
        if await self.prober.read_engine() is not True:
            return False
        self.asleep_level = await self.prober.level_found()
        self.apply(Event.FOUND_ASLEEP, during="the wake's check")
        return True

    async def run_restart(self, event: Event | None = None) -> None:
        """The restart command: for a broken engine, or (``recycle``) for a drifting asleep one."""
        if event is Event.RECYCLE:
            self.stats.recycles += 1
            self._recycled = True
            self.apply(Event.RECYCLE)
        self.restart_pending = False
        self.stats.restarts += 1
        ok = await self._restart() if self._restart is not None else False
        self.tell("restarted", ok)
        self._next_restart = self.clock.now() + self._restart_delay
        self._restart_delay = min(self._restart_delay * 2, RESTART_BACKOFF_MAX)
        self.prober.next_probe = self.clock.now()

    async def stop(self) -> None:
        """The ladder's stop rung: the stop command, then the engine must be gone."""
        self.apply(Event.STOP)
        outcome = await stop_engine(self)
        if outcome.event is not Event.FOUND_AWAKE:
            self.stats.record(outcome)
        if outcome.event is Event.ENGINE_STOPPED:
            self.asleep_level = None
            self.tell("engine_stopped", outcome.seconds)
        elif outcome.event is Event.FOUND_AWAKE:
            self.admission.last_work_end = self.clock.now()
        self._apply_outcome(outcome, Event.STOP)

    async def launch(self, event: Event) -> None:
        """Start a stopped engine for the work (or manual wake) waiting for it."""
        self.apply(event)
        outcome = await start_engine(self)
        self.stats.record(outcome)
        now = self.clock.now()
        if outcome.event is Event.START_FAILED:
            self._next_start = now + self._start_delay
            self._start_delay = min(self._start_delay * 2, RESTART_BACKOFF_MAX)
            self.tell("engine_started", False, outcome.seconds)
        else:
            self._start_delay = self.config.restart_backoff
            self.cycles, self.asleep_level = 0, None
            self.admission.last_work_end = now
            if outcome.event is Event.ENGINE_STARTED:
                self.tell("engine_started", True, outcome.seconds)
            elif outcome.event is Event.FOUND_ASLEEP:
                self.asleep_level = await self.prober.level_found()
            elif outcome.event is Event.CHECK_FAILED:
                self.stats.check_failures += 1
                self.stats.broken_reason = outcome.detail
        self._apply_outcome(outcome, event)
        if self.state is State.AWAKE and self.guard is not None:
            await self.guard.learn(awake=True)

    def _apply_outcome(self, outcome: Outcome, order: Event) -> None:
        details = {"sleep_level": outcome.level}
        if outcome.detail is not None:
            details["error" if outcome.event not in (Event.WOKE, Event.SLEPT, Event.ENGINE_STOPPED)
                    else "detail"] = outcome.detail
        if outcome.engine_seconds is not None:
            details["engine_wake_s"] = round(outcome.engine_seconds, 4)
        details["exit_status"] = outcome.exit_status
        self.apply(outcome.event, order=order.reason, **details)

    # ----- the one place the state changes ------------------------------------------------------

    def apply(self, event: Event, **details) -> None:
        old, new = self.state, next_state(self.state, event)
        if new is old:
            return
        now = self.clock.now()
        seconds, self.state, self._entered_at = now - self._entered_at, new, now
        self._log.info("transition", from_state=old.value, to_state=new.value, reason=event.reason,
                       duration_s=round(seconds, 4),
                       **{k: v for k, v in details.items() if v is not None})
        self.share_admission()
        for effect in ON_ENTER.get(new, ()):
            getattr(self, effect)()
        self.tell("transition", old, new, event.reason, seconds)
        self.planners.observe(event.value, self.status())
        self._transitioned.set()
        self._transitioned = asyncio.Event()

    # entry effects (states.ON_ENTER)
    def release_held(self) -> None:
        for waited in self.admission.release_all():
            self.tell("released", waited)

    def settle_sleep_order(self) -> None:
        if self._sleep_order is not None and self._sleep_order.level == self.asleep_level:
            self._settle_order(None)

    def plan_restart(self) -> None:
        self.restart_pending = True
        self._next_restart = self.clock.now()
        self.prober.next_probe = self.clock.now() + UNREACHABLE_BACKOFF[1]

    def probe_soon(self) -> None:
        self.prober.soon()

    def answer_held_after_failed_start(self) -> None:
        refused = self._start_backoff()
        if refused is not None:
            self.admission.refuse_all(refused)

    def probe_later(self) -> None:
        """A stopped engine is read now and then: an operator may start it by hand."""
        self.prober.next_probe = self.clock.now() + self.config.probe_interval

    # ----- small mechanics ----------------------------------------------------------------------

    def share_admission(self) -> None:
        """Worker processes admit on their own while the shared flag is open: it follows
        ``admit``'s fast path. Closing returns only once no worker can admit on the old flag."""
        shared = self.admission.elsewhere
        if shared is not None:
            shared.set_open(self.state is State.AWAKE and not self.prober.gate_closed
                            and not self.closing)

    def notice(self) -> None:
        """Something the loop reads changed outside this process (workers' activity)."""
        self._changed.set()

    def tell(self, what: str, *args) -> None:
        for observer in self._observers:
            getattr(observer, what)(*args)

    async def wait(self, deadline: float | None) -> None:
        """Until something changes (work, orders, release) or ``deadline`` (clock time).

        Callers check their condition right before, with no await between, so clearing first
        loses nothing.
        """
        self._changed.clear()
        deadline = self.admission.look_again(deadline)
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

    def _expired(self) -> Refused:
        """Why a held request's deadline passed, as the refusal it gets."""
        text = self.memory_wait["text"] if self.memory_wait is not None else None
        return self._refuse(*why_expired(self.status(), self.config.wake_timeout, text))

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
