"""The engine's GPU power: read through NVML, energy counted per state, and what sleeping saved.

Every ``SAMPLE_EVERY`` seconds, and at once after every transition, the draw of the engine's GPUs
is read (``nvmlDeviceGetPowerUsage``), with NVML's energy counter where the board has one
(``nvmlDeviceGetTotalEnergyConsumption``, Volta and later). The time between two readings is cut
at each transition; a state's energy is its time times the draw read in it (the earlier reading
for the states before a transition, the later one for the state after it). Where both readings
have the counter, the state the later reading was taken in gets the counter's difference less
what the earlier states were estimated to use, so it is measured rather than estimated.

The saving is estimated against staying awake and idle, from measured draws only: the awake-idle
draw is learned from readings taken while the engine was awake with no work for
``AWAKE_IDLE_SETTLE`` seconds, and awake that long (the median of the latest ones). Each second spent in a sleeping,
stopping, stopped or starting state saves that draw minus what was measured then; a cold start
costs more than idling, so the saving can shrink, and it is shown as it is. Until the awake-idle
draw is known, nothing is counted as saved.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import deque
from typing import Callable

from ..control.interfaces import Observer
from ..control.states import State
from .readers import GpuUnavailable

SAMPLE_EVERY = 5.0
AWAKE_IDLE_SETTLE = 10.0   # after work ends, the draw takes a few seconds to fall to idle
AWAKE_IDLE_SAMPLES = 60
# States in which the engine would otherwise have been awake and idle.
SAVING_STATES = frozenset({State.FALLING_ASLEEP, State.ASLEEP, State.WAKING, State.STOPPING,
                           State.STOPPED, State.LAUNCHING})


class PowerMeter(Observer):
    def __init__(self, guard, clock, idle_seconds: Callable[[], float]):
        self._guard = guard
        self._clock = clock
        self._idle_seconds = idle_seconds   # 0 while work is in flight or held
        self._state = State.STARTING
        self._state_since = clock.now()
        self._since = clock.now()           # the start of the time not yet cut into segments
        self._segments: list[tuple[State, float]] = []   # (state, seconds) since the last reading
        self._watts: float | None = None    # the last reading, summed over the engine's GPUs
        self._counter: float | None = None  # the energy counters' sum at that reading
        self.per_gpu: dict[str, float] = {}
        self.joules: dict[str, float] = {}  # state -> joules spent in it
        self.saved_joules = 0.0
        self.source: str | None = None      # "energy counter" or "power readings"
        self._idle_draws: deque[float] = deque(maxlen=AWAKE_IDLE_SAMPLES)
        self._due = asyncio.Event()
        self._transitions = 0               # a reading taken across one is read again

    @property
    def watts(self) -> float | None:
        return self._watts

    @property
    def read_until(self) -> float:
        """Clock time up to which readings and transitions have been taken in."""
        return self._since

    @property
    def awake_idle_watts(self) -> float | None:
        return statistics.median(self._idle_draws) if self._idle_draws else None

    # ----- the supervisor's Observer -----------------------------------------------------------

    def transition(self, old: State, new: State, reason: str, seconds: float) -> None:
        now = self._clock.now()
        self._segments.append((self._state, now - self._since))
        self._since = self._state_since = now
        self._state = new
        self._transitions += 1
        self._due.set()

    # ----- reading -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Read now, then every SAMPLE_EVERY seconds and after each transition."""
        while True:
            self._due.clear()   # before reading: a transition during it asks for another
            await self.sample()
            if self._due.is_set():
                continue
            timer = self._clock.call_at(self._clock.now() + SAMPLE_EVERY, self._due.set)
            try:
                await self._due.wait()
            finally:
                timer.cancel()

    async def sample(self) -> None:
        transitions = self._transitions
        try:
            gpus, pids = await self._guard.read()
        except GpuUnavailable:
            return self._unread()
        if transitions != self._transitions:
            return   # the state changed during the reading: it may show either; run() reads again
        mine = self._guard.engine_gpus(gpus, pids)
        draws = {g.uuid: g.power_watts for g in mine if g.power_watts is not None}
        if not draws:
            return self._unread()
        counters = [g.energy_joules for g in mine]
        counter = sum(counters) if all(c is not None for c in counters) else None
        now = self._clock.now()
        self._segments.append((self._state, now - self._since))
        self._since = now
        watts = sum(draws.values())
        self._count(self._segments, watts, counter)
        self._segments = []
        self._watts, self._counter, self.per_gpu = watts, counter, draws
        self.source = "energy counter" if counter is not None else "power readings"
        if (self._state is State.AWAKE and self._idle_seconds() >= AWAKE_IDLE_SETTLE
                and now - self._state_since >= AWAKE_IDLE_SETTLE):   # not the check after a wake
            self._idle_draws.append(self._watts)

    def _unread(self) -> None:
        """No draw read. Before any was (a MIG slice, a VM that refuses power readings), the time
        so far can never be counted: its segments are let go, not kept for ever."""
        if self._watts is None:
            self._segments = []
            self._since = self._clock.now()

    def _count(self, segments: list[tuple[State, float]], watts: float,
               counter: float | None) -> None:
        if self._watts is None:   # the first reading: nothing to count from
            return
        *earlier, (state, seconds) = segments
        for before, length in earlier:
            self._add(before, length, self._watts * length)
        joules = (watts if earlier else self._watts) * seconds
        if counter is not None and self._counter is not None and counter >= self._counter:
            joules = max(0.0, counter - self._counter - sum(self._watts * n for _, n in earlier))
        self._add(state, seconds, joules)

    def _add(self, state: State, seconds: float, joules: float) -> None:
        if seconds <= 0:
            return
        self.joules[state.value] = self.joules.get(state.value, 0.0) + joules
        idle = self.awake_idle_watts
        if state in SAVING_STATES and idle is not None:
            self.saved_joules += idle * seconds - joules

    def status(self) -> dict:
        def wh(joules: float) -> float:
            return round(joules / 3600, 4)

        idle = self.awake_idle_watts
        return {"watts": None if self._watts is None else round(self._watts, 1),
                "gpu_watts": {uuid: round(w, 1) for uuid, w in sorted(self.per_gpu.items())},
                "awake_idle_watts": None if idle is None else round(idle, 1),
                "source": self.source,
                "energy_wh": {state: wh(j) for state, j in sorted(self.joules.items())},
                "saved_wh": wh(self.saved_joules)}
