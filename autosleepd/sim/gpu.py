"""A simulated GPU that several simulated engines share, and that autosleepd reads as NVML.

It reproduces what was measured with vLLM 0.26 on an H200 (see the sleep contract): an engine
that wakes into too little memory maps what it can, answers 500 "out of memory", and keeps that
memory; it stays asleep, hangs every request, and every later wake fails at once with "invalid
argument", until its process is restarted.

Its power follows what was measured too: a bare GPU draws ``bare_watts``; each engine process
adds its own draw (``SimulatedEngine.watts``: its CUDA context, more while it generates), until
it exits. Given a clock, it also keeps NVML's energy counter (joules since "boot").
"""

from __future__ import annotations

from typing import Callable

from ..gpu.readers import GiB, GpuMemory



class SimGpu:
    def __init__(self, total: int = 80 * GiB, index: int = 0, uuid: str = "GPU-sim-0",
                 bare_watts: float = 77.5, clock=None):
        self.total = total
        self.index = index
        self.uuid = uuid
        self.holdings: dict[int, int] = {}   # pid -> bytes
        self.bare_watts = bare_watts        # no process (an H200 measured 77.5 W)
        self.draws: dict[int, Callable[[], float]] = {}   # pid -> its draw above bare, now
        self._clock = clock
        self._joules = 0.0
        self._counted_at = clock.now() if clock is not None else None
        self._counted_watts = bare_watts

    @property
    def used(self) -> int:
        return sum(self.holdings.values())

    @property
    def free(self) -> int:
        return self.total - self.used

    def take(self, pid: int, amount: int) -> int:
        """Map up to ``amount`` more bytes for ``pid``; return what was granted (maybe less)."""
        granted = max(0, min(amount, self.free))
        self.holdings[pid] = self.holdings.get(pid, 0) + granted
        return granted

    def set_holding(self, pid: int, amount: int) -> None:
        if amount:
            self.holdings[pid] = amount
        else:
            self.holdings.pop(pid, None)

    def release_all(self, pid: int) -> None:
        self.holdings.pop(pid, None)
        self.draws.pop(pid, None)
        self.count_energy()

    def attach(self, pid: int, draw: Callable[[], float]) -> None:
        """A process with a CUDA context on this GPU: ``draw()`` is its watts above bare."""
        self.draws[pid] = draw
        self.count_energy()

    @property
    def watts(self) -> float:
        return self.bare_watts + sum(draw() for draw in self.draws.values())

    def count_energy(self) -> None:
        """Add the draw since the last count to the energy counter; call after every change."""
        if self._clock is None:
            return
        now = self._clock.now()
        self._joules += self._counted_watts * (now - self._counted_at)
        self._counted_at, self._counted_watts = now, self.watts

    # ----- as autosleepd's NVML reader ------------------------------------------------------

    def read(self) -> list[GpuMemory]:
        self.count_energy()
        return [GpuMemory(self.index, self.uuid, self.total, self.used, dict(self.holdings),
                          power_watts=self.watts,
                          energy_joules=self._joules if self._clock is not None else None)]


class SimProcesses:
    """The process table autosleepd sees for simulated engines: one pid each, found by port."""

    def __init__(self, *engines, host_available: int = 512 * GiB):
        self._engines = list(engines)
        self.host_available = host_available

    def add(self, engine) -> None:
        self._engines.append(engine)

    def engine_pids(self, root_pid: int) -> set[int]:
        return {root_pid} if any(e.pid == root_pid for e in self._engines) else set()

    def pid_listening_on(self, port: int) -> int | None:
        for engine in self._engines:
            if engine.port == port and engine.listening:
                return engine.pid
        return None

    def resident_bytes(self, pids) -> int:
        return sum(e.host_bytes for e in self._engines if e.pid in pids)

    def host_available_bytes(self) -> int:
        return self.host_available - sum(e.host_bytes for e in self._engines)

    def cmdline(self, pid: int) -> list[str]:
        return []
