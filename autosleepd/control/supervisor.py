"""The one owner of the engine's state.

Every rule lives here: the states, the transitions allowed between them (``TRANSITIONS``), and
the one control loop (``run``) that decides, from events and the clock, when to probe, sleep,
wake, wait for GPU memory, evict a neighbour, restart a broken engine, pre-wake or deepen a
sleep. The proxy only calls ``admit``/``release`` and waits; the admin endpoints and neighbours
only place orders; the guard, the policy objects and the engine client only answer. Nothing else
changes the state, so no decision is ever taken on a stale view (llama-swap #946).

Activity is exactly two numbers: ``in_flight`` (admitted work not yet finished, a stream until its
last byte) and the queue of held requests. A held client that goes away leaves the queue and
leaves no trace.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Awaitable, Callable, Protocol, Sequence

import structlog

from ..clock import Clock
from ..config import Config
from .engine import EngineError, EngineUnreachable, SleepUnsupported
from ..policy.prewake import Plan, PrewakeLearner


class State(str, enum.Enum):
    STARTING = "starting"
    AWAKE = "awake"
    FALLING_ASLEEP = "falling_asleep"
    ASLEEP = "asleep"
    WAKING = "waking"
    UNAVAILABLE = "unavailable"
    BROKEN = "broken"          # a wake failed for good (an OOM zombie): only a restart helps


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.STARTING: frozenset({S.AWAKE, S.ASLEEP}),
    S.AWAKE: frozenset({S.FALLING_ASLEEP, S.ASLEEP, S.UNAVAILABLE, S.BROKEN}),
    S.FALLING_ASLEEP: frozenset({S.ASLEEP, S.AWAKE, S.UNAVAILABLE}),
    S.ASLEEP: frozenset({S.WAKING, S.AWAKE, S.UNAVAILABLE}),
    S.WAKING: frozenset({S.AWAKE, S.ASLEEP, S.UNAVAILABLE, S.BROKEN}),
    S.UNAVAILABLE: frozenset({S.AWAKE, S.ASLEEP}),
    S.BROKEN: frozenset({S.AWAKE}),   # once a restarted engine answers
}

# Re-reading an unreachable engine: quick at first (a restart is often fast), then every second.
UNREACHABLE_BACKOFF = (0.05, 1.0)
# Retrying a failed wake within the wake timeout; after this many failures in a row the engine
# is broken. An out-of-memory wake is broken at once: vLLM can never wake it again.
WAKE_RETRY_BACKOFF = (0.25, 5.0)
WAKE_ATTEMPTS = 3
# Re-running the restart command for an engine that came back broken: from
# AUTOSLEEPD_RESTART_BACKOFF, doubling up to this.
RESTART_BACKOFF_MAX = 300.0
PROBE_TIMEOUT = 10.0
LADDER_RETRY = 300.0   # a ladder step skipped for want of GPU memory is tried again this much later
STALE_PLAN = 600.0     # a pre-wake this late is dropped rather than run
INFERENCE_CHECK_TIMEOUT = 60.0


class Engine(Protocol):
    async def is_sleeping(self, timeout: float = ...) -> bool: ...
    async def sleep_level(self, timeout: float = ...) -> int | None: ...
    async def sleep(self, level: int, timeout: float) -> None: ...
    async def wake(self, level: int, timeout: float) -> None: ...
    async def check_inference(self, timeout: float) -> None: ...


Restarter = Callable[[], Awaitable[bool]]   # runs the restart command; True if it succeeded


class Guard(Protocol):
    """The memory guard (guard.MemoryGuard): questions about GPU and host memory."""

    async def shortfall(self): ...
    async def learn(self, awake: bool) -> None: ...
    async def before_sleep(self) -> None: ...
    async def after_sleep(self, level: int) -> int | None: ...
    def level_for_sleep(self, level: int) -> tuple[int | None, str | None]: ...
    async def read(self): ...
    def engine_gpus(self, gpus, pids): ...
    def status(self) -> dict: ...


class Neighbours(Protocol):
    """Other sidecars on the same GPUs (coordination.Coordinator)."""

    async def evict_for(self, gpu_uuid: str) -> str | None: ...
    def locks(self, uuids: list[str]): ...


class Observer:
    """What the supervisor reports as it goes; each observer overrides what it needs."""

    def transition(self, old: State, new: State, reason: str, seconds: float) -> None: ...
    def slept(self, level: int, reason: str, seconds: float) -> None: ...
    def woke(self, level: int, reason: str, seconds: float) -> None: ...
    def sleep_failed(self) -> None: ...
    def wake_failed(self) -> None: ...
    def released(self, held_seconds: float) -> None: ...
    def refused_request(self, reason: str) -> None: ...
    def memory_wait(self) -> None: ...
    def restarted(self, ok: bool) -> None: ...


class Refused(Exception):
    """Work that cannot be served, and why; the HTTP edge (proxy/errors.py) maps the reason."""

    REASONS = ("queue_full", "wake_timeout", "shutting_down", "engine_unavailable",
               "no_gpu_memory", "engine_broken")

    def __init__(self, reason: str, message: str):
        assert reason in self.REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message


class OrderFailed(Exception):
    """A manual sleep or wake that could not be carried out."""


class _HoldExpired(Exception):
    pass


@dataclass
class _Hold:
    work: bool            # False for a manual wake: it waits, but is not a request in flight
    since: float


@dataclass
class _SleepOrder:
    level: int
    reason: str
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class Stats:
    sleeps: int = 0
    wakes: int = 0
    sleep_failures: int = 0
    wake_failures: int = 0
    last_sleep_seconds: float | None = None
    last_wake_seconds: float | None = None
    last_engine_wake_seconds: float | None = None   # the engine's wake calls alone
    last_error: str | None = None
    last_freed_bytes: int | None = None   # GPU memory the last sleep gave back, as NVML saw it
    memory_waits: int = 0                 # wakes that had to wait for GPU memory
    prewakes: int = 0                     # wakes ahead of traffic (schedule or learned)
    ladder_steps: int = 0                 # sleeps deepened along the ladder
    ladder_skips: int = 0                 # steps skipped: the GPU had no room for the wake
    restarts: int = 0                     # runs of the restart command
    broken_reason: str | None = None


class Supervisor:
    def __init__(self, config: Config, engine: Engine, clock: Clock,
                 observers: Sequence[Observer] = (), guard: Guard | None = None,
                 neighbours: Neighbours | None = None, restart: Restarter | None = None,
                 learner: PrewakeLearner | None = None):
        self.config = config
        self._engine = engine
        self._clock = clock
        self._observers = list(observers)
        self._guard = guard
        self._neighbours = neighbours
        self._restart = restart
        self._learner = learner
        self._window_start: float | None = None   # wall time of the next keep-awake window
        self._plan: Plan | None = None             # the learned pre-wake ahead
        self._prewake_bucket: str | None = None    # a learned pre-wake not yet judged
        self._ladder_retry = 0.0
        self._last_work_wall = clock.wall()
        self._log = structlog.get_logger("autosleepd.supervisor")
        self.state = State.STARTING
        self.in_flight = 0
        self.sleep_supported = True
        self.asleep_level: int | None = None
        self.stats = Stats()
        self._held: dict[asyncio.Future, _Hold] = {}
        self._queued = 0                      # holds that are work (the rest are manual wakes)
        self._sleep_order: _SleepOrder | None = None
        self._entered_at = clock.now()
        self._last_work_end = clock.now()
        self._next_probe = clock.now()
        self._unreachable_delay = UNREACHABLE_BACKOFF[0]
        self._memory_wait: dict | None = None   # what a wake waits for, while it waits
        self._restart_delay = config.restart_backoff
        self._next_restart = clock.now()
        self._restart_pending = True            # broken, and no restart tried since
        self._changed = asyncio.Event()
        self._transitioned = asyncio.Event()
        self._closing = False
        self._drained = asyncio.Event()
        self._drained.set()

    # ----- what the proxy calls -------------------------------------------------------------

    async def admit(self, until: float | None = None) -> None:
        """Return once this work may reach the engine (counted in flight); raise ``Refused``.

        A held request waits at most the wake timeout, and never past ``until`` (clock time).
        """
        if self._learner is not None:
            self._note_arrival()
        if self.state is State.AWAKE and not self._closing:
            self._count_in()
            return
        if self._closing:
            raise self._refuse("shutting_down", "autosleepd is shutting down")
        if self._queued >= self.config.max_queue:
            raise self._refuse("queue_full", f"{self._queued} requests are already waiting for "
                               f"the engine (AUTOSLEEPD_MAX_QUEUE={self.config.max_queue})")
        try:
            await self._hold(work=True, until=until)
        except _HoldExpired:
            if self._memory_wait is not None:
                raise self._refuse("no_gpu_memory", "not enough GPU memory to wake the engine "
                                   f"within {self.config.wake_timeout:g}s: "
                                   f"{self._memory_wait['text']}") from None
            if self.state is State.BROKEN:
                raise self._refuse("engine_broken", "the engine is broken (a wake failed: "
                                   f"{self.stats.broken_reason}); it needs a restart") from None
            if self.state in (State.STARTING, State.UNAVAILABLE):
                raise self._refuse("engine_unavailable", "the engine at "
                                   f"{self.config.upstream} did not answer within "
                                   f"{self.config.wake_timeout:g}s") from None
            raise self._refuse("wake_timeout", f"the engine did not wake within "
                               f"{self.config.wake_timeout:g}s (state: {self.state.value})") from None

    def release(self) -> None:
        """Admitted work has ended (last byte sent, or the client went away)."""
        self.in_flight -= 1
        self._last_work_end = self._clock.now()
        if self._learner is not None:
            self._last_work_wall = self._clock.wall()
        if self.in_flight == 0:
            self._drained.set()
            self._changed.set()

    def engine_unreachable(self, detail: str) -> None:
        """The proxy could not connect: stop sending work and re-read the engine at once."""
        if self.state is State.AWAKE:
            self._enter(State.UNAVAILABLE, "connect_failed", detail=detail)
            self._next_probe = self._clock.now()
            self._changed.set()

    # ----- what the admin endpoints call ----------------------------------------------------

    async def order_evict(self) -> None:
        """A neighbour needs this GPU's memory: sleep now, but only if idle."""
        if self.state is not State.AWAKE or self.in_flight or self._held or self._sleep_order:
            raise OrderFailed(f"busy: {self.state.value}, {self.in_flight} in flight, "
                              f"{self._queued} held")
        if self.config.keep_awake and self.config.keep_awake.active(self._clock.wall()):
            raise OrderFailed("inside a keep-awake window")
        await self.order_sleep(self.config.sleep_level, reason="eviction")

    async def order_sleep(self, level: int, reason: str = "manual") -> None:
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
        if self._sleep_order is not None:
            if self._sleep_order.level != level:
                raise OrderFailed(f"a sleep at level {self._sleep_order.level} is already under way")
            order = self._sleep_order
        else:
            order = self._sleep_order = _SleepOrder(level, reason)
            self._changed.set()
        await asyncio.shield(order.done)

    async def order_wake(self) -> None:
        """Wake the engine; returns once awake. Raises ``OrderFailed``."""
        if self.state is State.AWAKE:
            return
        try:
            await self._hold(work=False)
        except _HoldExpired:
            raise OrderFailed(f"the engine did not wake within {self.config.wake_timeout:g}s "
                              f"(state: {self.state.value})") from None

    # ----- reading ---------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock.now()

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def broken(self) -> bool:
        return self.state is State.BROKEN

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def idle_seconds(self) -> float:
        if self.in_flight or self._queued:
            return 0.0
        return max(0.0, self._clock.now() - self._last_work_end)

    def status(self) -> dict:
        s = self.stats
        return {
            "state": self.state.value,
            "state_seconds": round(self._clock.now() - self._entered_at, 3),
            "sleep_level": self.asleep_level if self.state is State.ASLEEP else self.config.sleep_level,
            "sleep_supported": self.sleep_supported,
            "autosleep": self.config.autosleep,
            "idle_timeout_seconds": self.config.idle_timeout,
            "idle_seconds": round(self.idle_seconds(), 3),
            "in_flight": self.in_flight,
            "queued": self._queued,
            "upstream": self.config.upstream,
            "sleeps": s.sleeps,
            "wakes": s.wakes,
            "sleep_failures": s.sleep_failures,
            "wake_failures": s.wake_failures,
            "last_sleep_seconds": s.last_sleep_seconds,
            "last_wake_seconds": s.last_wake_seconds,
            "last_engine_wake_seconds": s.last_engine_wake_seconds,
            "last_error": s.last_error,
            "gpu_memory_freed_bytes": s.last_freed_bytes,
            "waiting_for_memory": (None if self._memory_wait is None else
                                   {k: v for k, v in self._memory_wait.items() if k != "text"}),
            "memory_waits": s.memory_waits,
            "broken_reason": s.broken_reason,
            "restarts": s.restarts,
            "memory": self._guard.status() if self._guard else None,
            "next_transition": self._next_transition(),
            "prewakes": s.prewakes,
            "prewakes_used": self._learner.used if self._learner else None,
            "prewakes_wasted": self._learner.wasted if self._learner else None,
            "ladder_steps": s.ladder_steps,
            "ladder_skips": s.ladder_skips,
        }

    async def wait_for(self, *states: State, timeout: float) -> None:
        """For tests and tooling: wait (real time) until the state is one of ``states``."""
        async with asyncio.timeout(timeout):
            while self.state not in states:
                await self._transitioned.wait()

    # ----- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """The control loop: every probe, sleep and wake is decided and carried out here."""
        while not self._closing:
            self._changed.clear()
            step, deadline = self._next_step()
            if step is None:
                await self._wait(deadline)
            else:
                await step()

    async def wait_drained(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        """Stop admitting; answer every held request. In-flight work is left to finish."""
        self._closing = True
        for future in list(self._held):
            if not future.done():
                future.set_exception(self._refuse("shutting_down", "autosleepd is shutting down"))
        if self._sleep_order and not self._sleep_order.done.done():
            self._sleep_order.done.set_exception(OrderFailed("autosleepd is shutting down"))
        self._changed.set()

    # ----- the policy ------------------------------------------------------------------------

    def _next_step(self):
        """What the control loop does next: (coroutine function, None) or (None, wake-up time)."""
        now = self._clock.now()
        state = self.state
        if state in (State.STARTING, State.UNAVAILABLE):
            self._fail_sleep_order(f"the engine is {state.value}")
            return (self._probe, None) if now >= self._next_probe else (None, self._next_probe)
        if state is State.ASLEEP:
            if self._held:
                return self._wake, None
            if self._sleep_order is not None:
                self._settle_sleep_order_asleep()
            plans = self._asleep_plans()
            if plans:
                at, step, _ = min(plans, key=lambda plan: plan[0])
                if now >= at:
                    return step, None
                if now < self._next_probe:
                    return None, min(at, self._next_probe)
        if state is State.BROKEN:
            self._fail_sleep_order("the engine is broken")
            if self._restart is not None and self._restart_pending and now >= self._next_restart:
                return self._restart_engine, None
            return (self._probe, None) if now >= self._next_probe else (None, self._next_probe)
        if state is State.AWAKE:
            if self._sleep_order is not None:
                order = self._sleep_order
                return (lambda: self._fall_asleep(order.level, order.reason, order)), None
            idle_at = self._idle_deadline()
            if idle_at is not None and self.config.keep_awake is not None:
                window = self.config.keep_awake.active(self._clock.wall())
                if window is not None:   # never asleep inside a keep-awake window
                    idle_at = max(idle_at, self._mono(window[1]))
            if idle_at is not None and now >= idle_at:
                return (lambda: self._fall_asleep(self.config.sleep_level, "idle", None)), None
            if now >= self._next_probe:
                return self._probe, None
            return None, min(self._next_probe, idle_at if idle_at is not None else self._next_probe)
        if now >= self._next_probe:
            return self._probe, None
        return None, self._next_probe

    # ----- planned transitions (schedule, learned pre-wake, ladder) --------------------------

    def _mono(self, wall: float) -> float:
        return self._clock.now() + (wall - self._clock.wall())

    def _asleep_plans(self) -> list[tuple[float, Callable, str]]:
        """What is due while asleep: (clock time, step, description), earliest first."""
        plans = []
        wall = self._clock.wall()
        if self.config.keep_awake is not None:
            if self._window_start is None:
                upcoming = self.config.keep_awake.next_start(wall)
                self._window_start = upcoming[1] if upcoming else float("inf")
            if self._window_start != float("inf"):
                window_start = self._window_start
                plans.append((self._mono(window_start), self._schedule_wake,
                              "wake: a keep-awake window starts"))
        if self._learner is not None:
            if self._plan is not None and self._plan.at < wall - STALE_PLAN:
                self._plan = None   # long overdue (the host was suspended, the clock jumped)
            if self._plan is None:
                self._plan = self._learner.plan(wall) or Plan(float("inf"), "", "")
            if self._plan.at != float("inf"):
                plans.append((self._mono(self._plan.at), self._learned_wake,
                              f"pre-wake: {self._plan.reason}"))
        if self.config.ladder is not None:
            deeper = self.config.ladder.deeper(self.asleep_level or self.config.sleep_level)
            if deeper is not None:
                at = max(self._last_work_end + deeper[0], self._ladder_retry)
                plans.append((at, lambda: self._deepen(deeper[1]),
                              f"sleep deeper, level {deeper[1]}: idle {deeper[0]:g}s"))
        return plans

    def _next_transition(self) -> dict | None:
        now, wall = self._clock.now(), self._clock.wall()
        if self.state is State.ASLEEP:
            plans = self._asleep_plans()
            if not plans:
                return None
            at, _, why = min(plans, key=lambda plan: plan[0])
        elif self.state is State.AWAKE:
            idle_at = self._idle_deadline()
            if idle_at is None:
                return None
            why = f"sleep at level {self.config.sleep_level}: idle {self.config.idle_timeout:g}s"
            window = self.config.keep_awake.active(wall) if self.config.keep_awake else None
            if window is not None and self._mono(window[1]) > idle_at:
                idle_at, why = self._mono(window[1]), f"sleep when the keep-awake window {window[0].text} ends"
            at = idle_at
        else:
            return None
        if at == float("inf"):
            return None
        return {"at": datetime.fromtimestamp(wall + at - now, timezone.utc).isoformat(timespec="seconds"),
                "in_seconds": round(max(0.0, at - now), 1), "what": why}

    async def _schedule_wake(self) -> None:
        window = self.config.keep_awake.active(self._clock.wall())
        self._window_start = None
        self.stats.prewakes += 1
        self._log.info("prewake", reason=f"keep-awake window {window[0].text if window else ''} starts")
        await self._wake(reason="schedule")

    async def _learned_wake(self) -> None:
        plan, self._plan = self._plan, None
        self._prewake_bucket = plan.bucket
        self.stats.prewakes += 1
        self._log.info("prewake", reason=plan.reason, bucket=plan.bucket)
        await self._wake(reason="prewake")

    async def _deepen(self, level: int) -> None:
        """One step down the ladder: wake, then sleep deeper; only with room, nobody waiting."""
        if self._guard is None:
            why = "the memory guard is off (no NVML), so the wake it needs cannot be checked"
        else:
            shortfall = await self._guard.shortfall()
            why = shortfall.describe() if shortfall else None
        if why is not None:
            self.stats.ladder_skips += 1
            self._ladder_retry = self._clock.now() + LADDER_RETRY
            self._log.warning("ladder_step_skipped", to_level=level, reason=why)
            return
        await self._wake(reason="ladder", restarts_idle=False)   # idle time goes on counting
        if self.state is State.AWAKE and not self.in_flight and not self._held:
            await self._fall_asleep(level, "ladder", None)
            if self.state is State.ASLEEP:
                self.stats.ladder_steps += 1

    def _note_arrival(self) -> None:
        """Work arrives: teach the learner when traffic resumes, and judge a pre-wake."""
        if not self.in_flight and not self._held:
            wall = self._clock.wall()
            if wall - self._last_work_wall >= self.config.idle_timeout:
                self._learner.record_resumption(wall, self._prewake_bucket)
                self._plan = None
        if self._prewake_bucket is not None:
            self._learner.judge(self._prewake_bucket, used=True)
            self._prewake_bucket = None

    def _idle_deadline(self) -> float | None:
        if not (self.config.autosleep and self.sleep_supported) or self.in_flight or self._held:
            return None
        return self._last_work_end + self.config.idle_timeout

    # ----- transitions (run only by the control loop) ----------------------------------------

    async def _read_engine(self) -> bool | EngineError:
        """``is_sleeping`` as the engine says it, or the error that kept it from saying."""
        try:
            return await self._engine.is_sleeping(timeout=PROBE_TIMEOUT)
        except SleepUnsupported as error:
            self._sleep_unsupported(error)
            return False
        except EngineError as error:
            return error

    async def _probe(self) -> None:
        """Re-read the engine's real state and follow it."""
        sleeping = await self._read_engine()
        if self.state is State.BROKEN:
            await self._probe_broken(sleeping)
            return
        if isinstance(sleeping, EngineError):
            self._engine_down(sleeping)
            return
        self._unreachable_delay = UNREACHABLE_BACKOFF[0]
        self._next_probe = self._clock.now() + self.config.probe_interval
        if sleeping and self.state is not State.ASLEEP:
            level = None
            try:
                level = await self._engine.sleep_level(timeout=PROBE_TIMEOUT)
            except EngineError:
                pass
            if level is None:
                level = self.asleep_level or self.config.sleep_level
                self._log.warning("sleep_level_unknown", assumed_level=level,
                                  hint="vLLM has no vllm:engine_sleep_state metric")
            self.asleep_level = level
            self._enter(State.ASLEEP, "found_asleep")
        elif not sleeping and self.state is not State.AWAKE:
            self._last_work_end = self._clock.now()   # the idle window starts when seen awake
            self._enter(State.AWAKE, "found_awake")
            if self._guard is not None:
                await self._guard.learn(awake=True)   # also finds the engine's processes early

    async def _probe_broken(self, sleeping: bool | EngineError) -> None:
        """A broken engine recovers only by a restart: a fresh vLLM answers awake and serves."""
        self._next_probe = self._clock.now() + UNREACHABLE_BACKOFF[1]
        if isinstance(sleeping, EngineError):
            self._restart_pending = False   # down, so restarting (or being restarted): let it load
            return
        if sleeping:
            self._restart_pending = True    # still the zombie
            return
        failure = await self._check_inference()
        if failure is not None:
            self._restart_pending = True
            return
        self.stats.broken_reason = None
        self._restart_delay = self.config.restart_backoff
        self.asleep_level = None
        self._last_work_end = self._clock.now()
        self._enter(State.AWAKE, "recovered")

    async def _restart_engine(self) -> None:
        self._restart_pending = False
        self.stats.restarts += 1
        ok = await self._restart()
        self._tell("restarted", ok)
        self._next_restart = self._clock.now() + self._restart_delay
        self._restart_delay = min(self._restart_delay * 2, RESTART_BACKOFF_MAX)
        self._next_probe = self._clock.now()

    async def _check_inference(self) -> str | None:
        """A one-token completion, when configured: None if the engine answered it."""
        if self.config.wake_check != "request":
            return None
        try:
            await self._engine.check_inference(timeout=INFERENCE_CHECK_TIMEOUT)
        except EngineError as error:
            return str(error)
        return None

    def _engine_down(self, error: EngineError) -> None:
        self.stats.last_error = str(error)
        if self.state is not State.STARTING and self.state is not State.UNAVAILABLE:
            self._enter(State.UNAVAILABLE, "probe_failed", error=str(error))
        elif isinstance(error, EngineUnreachable):
            self._log.debug("engine_not_reachable", error=str(error))
        else:
            self._log.warning("engine_probe_failed", error=str(error))
        self._next_probe = self._clock.now() + self._unreachable_delay
        self._unreachable_delay = min(self._unreachable_delay * 2, UNREACHABLE_BACKOFF[1])

    def _sleep_unsupported(self, error: EngineError) -> None:
        if self.sleep_supported:
            self.sleep_supported = False
            self.stats.last_error = str(error)
            self._log.error("sleep_unsupported", error=str(error),
                            hint="start vLLM with VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode; "
                                 "autosleepd keeps proxying without sleeping")

    async def _fall_asleep(self, level: int, reason: str, order: _SleepOrder | None) -> None:
        if self._guard is not None:
            chosen, why = self._guard.level_for_sleep(level)
            if chosen is None:
                self._sleep_order = None
                self._last_work_end = self._clock.now()   # ask again after another idle window
                self._log.warning("sleep_refused", sleep_level=level, reason=why,
                                  hint="AUTOSLEEPD_LEVEL1_FALLBACK=refuse")
                self._settle(order, OrderFailed(f"a level-1 sleep was refused: {why}"))
                return
            if chosen != level:
                self._log.warning("level1_fallback", from_level=level, to_level=chosen, reason=why)
                level = chosen
        self._enter(State.FALLING_ASLEEP, reason, sleep_level=level)
        started = self._clock.now()
        if self.in_flight:
            drain_end = started + self.config.drain_timeout
            while self.in_flight and self._clock.now() < drain_end and not self._closing:
                self._changed.clear()
                await self._wait(drain_end)
            if self.in_flight:
                self._sleep_order = None
                self._enter(State.AWAKE, "drain_timeout", in_flight=self.in_flight)
                self._settle(order, OrderFailed(f"{self.in_flight} requests were still in flight "
                                                f"after {self.config.drain_timeout:g}s"))
                return
        if self._guard is not None:
            await self._guard.before_sleep()
        try:
            await self._engine.sleep(level, timeout=self.config.sleep_timeout)
        except EngineError as error:
            self._sleep_order = None
            self.stats.sleep_failures += 1
            self._tell("sleep_failed")
            self.stats.last_error = str(error)
            self._log.error("sleep_failed", sleep_level=level, reason=reason, error=str(error))
            if isinstance(error, SleepUnsupported):
                self._sleep_unsupported(error)
            await self._probe()
            if self.state is State.FALLING_ASLEEP:   # the probe could not tell: assume awake
                self._enter(State.AWAKE, "sleep_failed")
            self._last_work_end = self._clock.now()   # try again only after another idle window
            self._settle(order, OrderFailed(f"the sleep call failed: {error}"))
            return
        seconds = self._clock.now() - started
        if self._guard is not None:
            freed = await self._guard.after_sleep(level)
            if freed is not None:
                self.stats.last_freed_bytes = freed
        self._sleep_order = None
        self.asleep_level = level
        self.stats.sleeps += 1
        self.stats.last_sleep_seconds = round(seconds, 3)
        self._enter(State.ASLEEP, reason, sleep_level=level)
        self._tell("slept", level, reason, seconds)
        self._window_start = None
        if self._prewake_bucket is not None:   # woken ahead of traffic that never came
            self._learner.judge(self._prewake_bucket, used=False)
            self._prewake_bucket = None
            self._plan = None
        self._settle(order, None)

    async def _wake(self, reason: str | None = None, restarts_idle: bool = True) -> None:
        level = self.asleep_level or self.config.sleep_level
        reason = reason or ("request" if self._queued else "manual")
        self._enter(State.WAKING, reason, sleep_level=level)
        started = self._clock.now()
        locks = await self._wait_for_room()
        if locks is False:
            return
        try:
            engine_seconds = await self._call_wake(level)
        finally:
            if locks is not None:
                locks.release()
        if engine_seconds is None:
            return
        seconds = self._clock.now() - started
        self.stats.wakes += 1
        self.stats.last_wake_seconds = round(seconds, 3)
        self.stats.last_engine_wake_seconds = round(engine_seconds, 4)
        self.asleep_level = None
        if restarts_idle:
            self._last_work_end = self._clock.now()
        self._enter(State.AWAKE, reason, sleep_level=level, engine_wake_s=round(engine_seconds, 4))
        self._tell("woke", level, reason, seconds)
        # The one-token check runs while the released requests are already on their way: it
        # costs them nothing, and an engine that fails it is still marked broken (and restarted).
        failure = await self._check_inference()
        if failure is not None:
            self._become_broken(f"awake, but a one-token completion failed: {failure}")
            return
        if self._guard is not None:
            await self._guard.learn(awake=True)

    async def _wait_for_room(self):
        """Hold the wake until the engine's GPUs have room for it.

        Returns the GPU locks to release after the wake (None without coordination), or False
        when nobody waits any more: then the engine stays asleep and no /wake_up was sent.
        """
        if self._guard is None:
            return None
        locks = None
        waited = False
        try:
            while True:
                if locks is None and self._neighbours is not None:
                    gpus, pids = await self._guard.read()
                    locks = self._neighbours.locks([g.uuid for g in self._guard.engine_gpus(gpus, pids)])
                if locks is not None and not locks.try_acquire():
                    self._note_memory_wait({"text": "another sidecar is waking on the same GPU",
                                            "gpu_lock": True})
                else:
                    shortfall = await self._guard.shortfall()
                    if shortfall is None:
                        if waited:
                            self._log.info("memory_available")
                        self._memory_wait = None
                        return locks
                    self._note_memory_wait({"text": shortfall.describe(), **shortfall.as_dict()})
                if not waited:
                    waited = True
                    self.stats.memory_waits += 1
                    self._tell("memory_wait")
                if (self._memory_wait and not self._memory_wait.get("gpu_lock")
                        and self._neighbours is not None
                        and await self._neighbours.evict_for(self._memory_wait["uuid"])):
                    continue   # a neighbour slept: read the memory again at once
                if not self._held or self._closing:
                    self._log.warning("wake_abandoned", reason="no GPU memory, and nobody waits any more",
                                      waited_for=self._memory_wait["text"])
                    self._memory_wait = None
                    if locks is not None:
                        locks.release()
                    self._enter(State.ASLEEP, "no_gpu_memory")
                    return False
                self._changed.clear()
                await self._wait(self._clock.now() + self.config.memory_poll)
        except BaseException:
            if locks is not None:
                locks.release()
            raise

    def _note_memory_wait(self, wait: dict) -> None:
        if self._memory_wait is None or self._memory_wait["text"] != wait["text"]:
            self._log.warning("waiting_for_memory", **{k: v for k, v in wait.items()})
        self._memory_wait = wait

    async def _call_wake(self, level: int) -> float | None:
        """The wake calls, retried with backoff while anyone waits.

        Returns how long the engine's own wake took once it is awake, or None when it is not.
        """
        delay = WAKE_RETRY_BACKOFF[0]
        failures = 0
        while True:
            called = self._clock.now()
            try:
                await self._engine.wake(level, timeout=self.config.wake_timeout)
                engine_seconds = self._clock.now() - called
                if await self._engine.is_sleeping(timeout=PROBE_TIMEOUT):
                    raise EngineError("the engine still reports is_sleeping=true after the wake")
            except EngineError as error:
                failures += 1
                self.stats.wake_failures += 1
                self.stats.last_error = str(error)
                self._tell("wake_failed")
                self._log.error("wake_failed", sleep_level=level, error=str(error), attempt=failures)
                sleeping = await self._read_engine()
                if isinstance(sleeping, EngineError):
                    self._engine_down(sleeping)
                    return None
                if not sleeping:
                    return self._clock.now() - called   # the engine is awake after all
                if "out of memory" in str(error).lower() or failures >= WAKE_ATTEMPTS:
                    self._become_broken(str(error))
                    return None
                if not self._held or self._closing:
                    self._enter(State.ASLEEP, "wake_failed")
                    return None
                self._changed.clear()
                await self._wait(self._clock.now() + delay)
                delay = min(delay * 2, WAKE_RETRY_BACKOFF[1])
                if not self._held:
                    self._enter(State.ASLEEP, "wake_abandoned")
                    return None
                continue
            return engine_seconds

    def _become_broken(self, why: str) -> None:
        self.stats.broken_reason = why
        self._restart_pending = True
        self._next_restart = self._clock.now()
        self._next_probe = self._clock.now() + UNREACHABLE_BACKOFF[1]
        self._enter(State.BROKEN, "wake_failed", error=why)

    # ----- mechanics -------------------------------------------------------------------------

    def _tell(self, event: str, *args) -> None:
        for observer in self._observers:
            getattr(observer, event)(*args)

    def _enter(self, new: State, reason: str, **details) -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise AssertionError(f"transition {old.value} -> {new.value} is not allowed")
        now = self._clock.now()
        seconds = now - self._entered_at
        self.state, self._entered_at = new, now
        self._log.info("transition", from_state=old.value, to_state=new.value, reason=reason,
                       duration_s=round(seconds, 4), **details)
        if new is State.AWAKE:
            self._release_held()
        self._tell("transition", old, new, reason, seconds)
        self._transitioned.set()
        self._transitioned = asyncio.Event()

    def _release_held(self) -> None:
        now = self._clock.now()
        held, self._held, self._queued = self._held, {}, 0
        for future, hold in held.items():   # dicts keep arrival order
            if future.done():
                continue
            if hold.work:
                self._count_in()
                self._tell("released", now - hold.since)
            future.set_result(None)

    def _count_in(self) -> None:
        self.in_flight += 1
        self._drained.clear()

    async def _hold(self, work: bool, until: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        now = self._clock.now()
        deadline = now + self.config.wake_timeout
        if until is not None:
            deadline = min(deadline, until)
        self._held[future] = _Hold(work, now)
        self._queued += work
        timer = self._clock.call_at(deadline,
                                    lambda: future.done() or future.set_exception(_HoldExpired()))
        self._changed.set()
        try:
            await future
        except asyncio.CancelledError:
            # The client went away. If it had just been let in, give its place back.
            if work and future.done() and not future.cancelled() and future.exception() is None:
                self.release()
            raise
        finally:
            timer.cancel()
            if self._held.pop(future, None) is not None:
                self._queued -= work
                self._changed.set()

    async def _wait(self, deadline: float | None) -> None:
        timer = None
        if deadline is not None:
            timer = self._clock.call_at(deadline, self._changed.set)
        try:
            await self._changed.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _refuse(self, reason: str, message: str) -> Refused:
        self._tell("refused_request", reason)
        return Refused(reason, message)

    def _fail_sleep_order(self, message: str) -> None:
        if self._sleep_order is not None:
            order, self._sleep_order = self._sleep_order, None
            self._settle(order, OrderFailed(message))

    def _settle_sleep_order_asleep(self) -> None:
        order, self._sleep_order = self._sleep_order, None
        if order.level == self.asleep_level:
            self._settle(order, None)
        else:
            self._settle(order, OrderFailed(f"the engine sleeps at level {self.asleep_level}"))

    @staticmethod
    def _settle(order: _SleepOrder | None, error: Exception | None) -> None:
        if order is None or order.done.done():
            return
        if error is None:
            order.done.set_result(None)
        else:
            order.done.set_exception(error)
