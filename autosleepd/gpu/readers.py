"""At the edge: GPU memory and power through NVML, host memory and processes through psutil.

Each reader is a thin wrapper with no policy, so tests replace it with a fake (or with the
simulator's GPU) and the policy above it runs unchanged.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Iterable, Protocol

import psutil

GiB = 2**30


class GpuUnavailable(Exception):
    """No NVML: no GPU, no driver, or no access to the device nodes."""


@dataclass(frozen=True)
class GpuMemory:
    index: int
    uuid: str
    total: int
    used: int
    processes: dict[int, int] = field(default_factory=dict)   # pid -> bytes on this GPU
    power_watts: float | None = None     # the board's draw now (None: not readable here)
    energy_joules: float | None = None   # its energy counter since the driver loaded (Volta+)

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)


class GpuReader(Protocol):
    def read(self) -> list[GpuMemory]: ...


class NvmlReader:
    """Every GPU NVML sees, with the memory each process holds on it."""

    def __init__(self) -> None:
        try:
            import pynvml
            pynvml.nvmlInit()
        except Exception as error:   # NVMLError_LibraryNotFound, DriverNotLoaded, NoPermission...
            raise GpuUnavailable(f"NVML is not available: {error}") from None
        self._nvml = pynvml

    def read(self) -> list[GpuMemory]:
        nvml = self._nvml
        try:
            gpus = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                processes = {}
                for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    used = process.usedGpuMemory
                    processes[process.pid] = int(used) if used is not None else 0
                watts, joules = self._power(handle)
                gpus.append(GpuMemory(index, uuid.decode() if isinstance(uuid, bytes) else uuid,
                                      int(info.total), int(info.used), processes, watts, joules))
            return gpus
        except nvml.NVMLError as error:
            raise GpuUnavailable(f"NVML read failed: {error}") from None


    def _power(self, handle) -> tuple[float | None, float | None]:
        """Draw in watts and the energy counter in joules; None where the board has neither
        (NVML reports milliwatts and millijoules; some boards, MIG slices and VMs refuse)."""
        nvml, readings = self._nvml, []
        for call in (nvml.nvmlDeviceGetPowerUsage, nvml.nvmlDeviceGetTotalEnergyConsumption):
            try:
                readings.append(call(handle) / 1000.0)
            except nvml.NVMLError:
                readings.append(None)
        return readings[0], readings[1]


def open_nvml() -> NvmlReader | None:
    try:
        return NvmlReader()
    except GpuUnavailable:
        return None


async def read_gpus(reader: GpuReader) -> list[GpuMemory]:
    # NVML calls block for a moment; keep them off the event loop.
    return await asyncio.to_thread(reader.read)


class Processes(Protocol):
    """The host's process table and memory, as the guard needs them."""

    def engine_pids(self, root_pid: int) -> set[int]: ...
    def pid_listening_on(self, port: int) -> int | None: ...
    def resident_bytes(self, pids: Iterable[int]) -> int: ...
    def host_available_bytes(self) -> int: ...
    def cmdline(self, pid: int) -> list[str]: ...


class HostProcesses:
    """psutil on this host."""

    def engine_pids(self, root_pid: int) -> set[int]:
        """The engine's process and all its children (vLLM runs its engine core in a child)."""
        try:
            root = psutil.Process(root_pid)
            return {root_pid} | {child.pid for child in root.children(recursive=True)}
        except psutil.Error:
            return set()

    def pid_listening_on(self, port: int) -> int | None:
        """The process that listens on ``port`` (the vLLM API server), if this host shows it."""
        try:
            for conn in psutil.net_connections(kind="inet"):
                if (conn.status == psutil.CONN_LISTEN and conn.laddr
                        and conn.laddr.port == port and conn.pid):
                    return conn.pid
        except psutil.Error:
            return None
        return None

    def resident_bytes(self, pids: Iterable[int]) -> int:
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        return total

    def host_available_bytes(self) -> int:
        return psutil.virtual_memory().available

    def cmdline(self, pid: int) -> list[str]:
        try:
            return psutil.Process(pid).cmdline()
        except psutil.Error:
            return []
