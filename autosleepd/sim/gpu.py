"""A simulated GPU that several simulated engines share, and that autosleepd reads as NVML.

It reproduces what was measured with vLLM 0.26 on an H200 (see the sleep contract): an engine
that wakes into too little memory maps what it can, answers 500 "out of memory", and keeps that
memory; it stays asleep, hangs every request, and every later wake fails at once with "invalid
argument", until its process is restarted.
"""

from __future__ import annotations

from ..gpu.readers import GiB, GpuMemory



class SimGpu:
    def __init__(self, total: int = 80 * GiB, index: int = 0, uuid: str = "GPU-sim-0"):
        self.total = total
        self.index = index
        self.uuid = uuid
        self.holdings: dict[int, int] = {}   # pid -> bytes

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

    # ----- as autosleepd's NVML reader ------------------------------------------------------

    def read(self) -> list[GpuMemory]:
        return [GpuMemory(self.index, self.uuid, self.total, self.used, dict(self.holdings))]


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
