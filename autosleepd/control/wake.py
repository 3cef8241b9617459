"""The wake procedure: room on the GPU, the wake calls, their check; one outcome.

Exactly one wake runs at a time (the control loop awaits it), so there is never a second
``/wake_up`` or ``reload_weights`` while one runs. It goes on when the clients that asked for it
give up: the next request finds it further along. AUTOSLEEPD_ENGINE_WAKE_TIMEOUT bounds it on the
engine's side; AUTOSLEEPD_WAKE_TIMEOUT only bounds how long a client is held.

Slow is not broken. Only an explicit failure counts toward ``broken``: an error answer (three in
a row), the out-of-memory answer (at once: vLLM can never wake that engine again), a failed
check, or the engine-side deadline passed.
"""

from __future__ import annotations

import structlog

from ..gpu.readers import GpuUnavailable
from .engine import EngineError, EngineTimeout
from .states import Event, Outcome

# Retrying a wake that failed with an answer, while anyone waits: quick, then up to 5 s apart.
RETRY_BACKOFF = (0.25, 5.0)
ATTEMPTS = 3
STILL_WAKING_EVERY = 10.0   # a long wake (a level-2 reload of a large model) says it goes on

_log = structlog.get_logger("autosleepd.wake")


async def wake_engine(owner, level: int) -> Outcome:
    """``owner`` is the Supervisor: its clock, engine, guard, admission, config, checker, wait."""
    started = owner.clock.now()
    locks = await _room(owner)
    if locks is False:
        return Outcome(Event.NO_GPU_MEMORY, "no GPU memory, and nobody waits any more", level=level)
    progress = _Progress(owner.clock, started)
    try:
        outcome = await _call(owner, level, started, progress)
    finally:
        progress.stop()
        if locks is not None:
            locks.release()
    if outcome.event is Event.WOKE and owner.checker.before_release:
        failure = await owner.checker.verify()
        if failure is not None:
            owner.stats.check_failures += 1
            return Outcome(Event.WAKE_FAILED, failure, level=level)
    return outcome


async def _call(owner, level: int, started: float, progress: _Progress) -> Outcome:
    clock, engine = owner.clock, owner.engine
    deadline = started + owner.config.engine_wake_timeout
    delay, failures = RETRY_BACKOFF[0], 0
    while True:
        called = clock.now()
        try:
            await engine.wake(level, timeout=max(0.001, deadline - called), on_step=progress.step)
            engine_seconds = clock.now() - called
            if await engine.is_sleeping(timeout=owner.config.connect_timeout + 5):
                raise EngineError("the engine still reports is_sleeping=true after the wake")
            return Outcome(Event.WOKE, level=level, seconds=clock.now() - started,
                           engine_seconds=engine_seconds)
        except EngineError as error:
            failures += 1
            owner.stats.wake_failures += 1
            owner.stats.last_error = str(error)
            owner.tell("wake_failed")
            _log.error("wake_failed", sleep_level=level, error=str(error), attempt=failures)
            if isinstance(error, EngineTimeout):   # its timeout is what was left of the deadline
                return Outcome(Event.WAKE_FAILED, "the wake did not finish within "
                               f"AUTOSLEEPD_ENGINE_WAKE_TIMEOUT={owner.config.engine_wake_timeout:g}s",
                               level=level)
            sleeping = await owner.prober.read_engine()
            if isinstance(sleeping, EngineError):
                return Outcome(Event.PROBE_FAILED, str(sleeping), level=level)
            if not sleeping:
                return Outcome(Event.FOUND_AWAKE, str(error), level=level,
                               seconds=clock.now() - started, engine_seconds=clock.now() - called)
            if "out of memory" in str(error).lower() or failures >= ATTEMPTS:
                return Outcome(Event.WAKE_FAILED, str(error), level=level)
            if not owner.admission.waiting or owner.closing:
                return Outcome(Event.WAKE_ABANDONED, str(error), level=level)
            await owner.wait(min(deadline, clock.now() + delay))
            delay = min(delay * 2, RETRY_BACKOFF[1])
            if not owner.admission.waiting:
                return Outcome(Event.WAKE_ABANDONED, str(error), level=level)


async def _room(owner):
    """Hold the wake until the engine's GPUs have room for it.

    Returns the GPU locks to release after the wake (None without coordination), or False when
    nobody waits any more: then the engine stays asleep and no /wake_up was sent.
    """
    guard, neighbours = owner.guard, owner.neighbours
    if guard is None:
        return None
    locks, waited = None, False
    try:
        while True:
            if locks is None and neighbours is not None:
                try:
                    gpus, pids = await guard.read()
                except GpuUnavailable:   # NVML failing: no GPU to lock (the shortfall check says why)
                    gpus, pids = [], set()
                locks = neighbours.locks([g.uuid for g in guard.engine_gpus(gpus, pids)])
            if locks is not None and not locks.try_acquire():
                owner.note_memory_wait({"text": "another sidecar is waking on the same GPU",
                                        "gpu_lock": True})
            else:
                shortfall = await guard.shortfall()
                if shortfall is None:
                    if waited:
                        _log.info("memory_available")
                    owner.note_memory_wait(None)
                    return locks
                owner.note_memory_wait({"text": shortfall.describe(), **shortfall.as_dict()})
            if not waited:
                waited = True
                owner.stats.memory_waits += 1
                owner.tell("memory_wait")
            wait = owner.memory_wait
            if (not wait.get("gpu_lock") and neighbours is not None
                    and await neighbours.evict_for(wait["uuid"])):
                continue   # a neighbour slept: read the memory again at once
            if not owner.admission.waiting or owner.closing:
                _log.warning("wake_abandoned", reason="no GPU memory, and nobody waits any more",
                             waited_for=wait["text"])
                owner.note_memory_wait(None)
                if locks is not None:
                    locks.release()
                return False
            await owner.wait(owner.clock.now() + owner.config.memory_poll)
    except BaseException:
        if locks is not None:
            locks.release()
        raise


class _Progress:
    """Logs each wake step with its duration, and a line every STILL_WAKING_EVERY meanwhile."""

    def __init__(self, clock, started: float):
        self._clock = clock
        self._started = started
        self._last_step = "started"
        self._timer = clock.call_at(started + STILL_WAKING_EVERY, self._still)

    def step(self, name: str, seconds: float) -> None:
        self._last_step = name
        _log.info("wake_step", step=name, duration_s=round(seconds, 4))

    def _still(self) -> None:
        elapsed = self._clock.now() - self._started
        _log.info("still_waking", elapsed_s=round(elapsed, 1), last_step=self._last_step)
        self._timer = self._clock.call_at(self._clock.now() + STILL_WAKING_EVERY, self._still)

    def stop(self) -> None:
        self._timer.cancel()
