"""The memory guard: knows, before a wake, whether the engine's GPUs have room for it.

It learns what the engine holds on each GPU awake and asleep (from NVML's per-process usage
of the engine's process tree), so the next wake knows how much it will map; an explicit
``AUTOSLEEPD_WAKE_MEMORY`` overrides that. Where the engine's processes cannot be seen (another
PID namespace, another user: a container, a systemd dynamic user), it learns from the whole
device instead: how much used memory fell across its own sleeps and rose across its own wakes.
It also checks host RAM before a level-1 sleep, which copies the weights into pinned CPU memory.

It answers questions; the supervisor decides what to do with the answers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog

from ..config import Config
from .readers import GiB, GpuMemory, GpuReader, GpuUnavailable, Processes, read_gpus

NOISE = 256 * 2**20   # device-level changes smaller than this are not the engine's
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def gib(amount: int) -> str:
    return f"{amount / GiB:.1f} GiB"


@dataclass(frozen=True)
class Shortfall:
    """One GPU without room for the wake."""

    gpu: GpuMemory
    needed: int                     # free memory the wake needs on this GPU, margin included
    holders: tuple[tuple[int, int], ...] = ()   # (pid, bytes) of others, largest first

    def describe(self) -> str:
        text = (f"GPU {self.gpu.index} ({self.gpu.uuid}) has {gib(self.gpu.free)} free, "
                f"the wake needs {gib(self.needed)}")
        if self.holders:
            text += "; held by " + ", ".join(f"pid {pid} ({gib(used)})" for pid, used in self.holders[:3])
        return text

    def as_dict(self) -> dict:
        return {"gpu": self.gpu.index, "uuid": self.gpu.uuid, "free_bytes": self.gpu.free,
                "needed_bytes": self.needed,
                "holders": [{"pid": pid, "bytes": used} for pid, used in self.holders]}


@dataclass
class Learned:
    awake: dict[str, int] = field(default_factory=dict)    # GPU uuid -> engine bytes awake
    asleep: dict[str, int] = field(default_factory=dict)   # GPU uuid -> engine bytes asleep
    freed: dict[str, int] = field(default_factory=dict)    # GPU uuid -> bytes the last sleep freed
    mapped: dict[str, int] = field(default_factory=dict)   # GPU uuid -> bytes the last wake mapped
    weights_host: int | None = None                        # host RAM a level-1 sleep took


class MemoryGuard:
    def __init__(self, config: Config, gpu: GpuReader, processes: Processes):
        self.config = config
        self._gpu = gpu
        self._processes = processes
        self._log = structlog.get_logger("autosleepd.guard")
        self.learned = Learned()
        self._used_before_sleep: dict[str, int] = {}
        self._used_before_wake: dict[str, int] = {}   # device-level: the reading that let a wake go
        self._attribution: str | None = None          # "process" or "device", once read
        self._rss_before_sleep: int | None = None
        self._pid_warned = False
        self._last_gpus: list[GpuMemory] = []
        self._root_pid: int | None = None   # found once: finding it scans every socket on the host

    # ----- the engine's processes -------------------------------------------------------------

    def engine_pids(self) -> set[int]:
        pid = self.config.engine_pid or self._root_pid
        if pid is not None:
            pids = self._processes.engine_pids(pid)
            if pids or self.config.engine_pid:
                return pids
            self._root_pid = None   # that process is gone: vLLM was restarted
        upstream = urlsplit(self.config.upstream)
        if upstream.hostname in _LOCAL_HOSTS:
            pid = self._root_pid = self._processes.pid_listening_on(upstream.port or 80)
        if pid is None:
            if not self._pid_warned:
                self._pid_warned = True
                self._log.warning("engine_process_not_found", hint="set AUTOSLEEPD_ENGINE_PID, or "
                                  "share the PID namespace with vLLM; falling back to whole-GPU readings")
            return set()
        return self._processes.engine_pids(pid)

    async def read(self) -> tuple[list[GpuMemory], set[int]]:
        gpus = await read_gpus(self._gpu)
        self._last_gpus = gpus
        pids = await asyncio.to_thread(self.engine_pids)
        self._attribution = "process" if pids else "device"
        return gpus, pids

    def engine_gpus(self, gpus: list[GpuMemory], pids: set[int]) -> list[GpuMemory]:
        """The GPUs the engine uses: configured, else where its processes hold memory, else all."""
        if self.config.gpus:
            chosen = [g for g in gpus if str(g.index) in self.config.gpus or g.uuid in self.config.gpus]
            if chosen:
                return chosen
        if pids:
            mine = [g for g in gpus if any(pid in g.processes for pid in pids)]
            if mine:
                return mine
        learned = self.learned
        known = set(learned.awake) | {uuid for uuid, amount in [*learned.freed.items(),
                                                                 *learned.mapped.items()] if amount}
        return [g for g in gpus if g.uuid in known] or gpus

    @staticmethod
    def engine_holding(gpu: GpuMemory, pids: set[int]) -> int | None:
        if not pids:
            return None
        return sum(used for pid, used in gpu.processes.items() if pid in pids)

    # ----- learning ---------------------------------------------------------------------------

    async def learn(self, awake: bool) -> None:
        """Record what the engine holds now, awake or asleep."""
        try:
            gpus, pids = await self.read()
        except GpuUnavailable:
            return
        if awake and not pids:
            self._learn_wake(gpus)
            return
        target = self.learned.awake if awake else self.learned.asleep
        for gpu in self.engine_gpus(gpus, pids):
            holding = self.engine_holding(gpu, pids)
            if holding:
                target[gpu.uuid] = holding

    def _learn_wake(self, gpus: list[GpuMemory]) -> None:
        """Device-level: what the wake just done mapped is how much used memory rose across it."""
        before, self._used_before_wake = self._used_before_wake, {}
        for gpu in gpus:
            if gpu.uuid in before and gpu.used - before[gpu.uuid] > NOISE:
                self.learned.mapped[gpu.uuid] = gpu.used - before[gpu.uuid]

    async def before_sleep(self) -> None:
        self._used_before_wake = {}
        try:
            gpus, pids = await self.read()
        except GpuUnavailable:
            return
        self._used_before_sleep = {g.uuid: g.used for g in gpus}
        self._rss_before_sleep = self._processes.resident_bytes(pids) if pids else None
        for gpu in self.engine_gpus(gpus, pids):
            holding = self.engine_holding(gpu, pids)
            if holding:
                self.learned.awake[gpu.uuid] = holding

    async def after_sleep(self, level: int) -> int | None:
        """Learn from the sleep just done; return the GPU memory it freed, if known."""
        try:
            gpus, pids = await self.read()
        except GpuUnavailable:
            return None
        freed_total = 0
        for gpu in self.engine_gpus(gpus, pids):
            before = self._used_before_sleep.get(gpu.uuid)
            if before is not None:
                freed = before - gpu.used
                self.learned.freed[gpu.uuid] = max(0, freed) if pids or freed > NOISE else 0
                freed_total += max(0, freed)
            holding = self.engine_holding(gpu, pids)
            if holding is not None:
                self.learned.asleep[gpu.uuid] = holding
        if level == 1 and pids and self._rss_before_sleep is not None:
            grown = self._processes.resident_bytes(pids) - self._rss_before_sleep
            if grown > 0:
                self.learned.weights_host = grown
        return freed_total if self._used_before_sleep else None

    # ----- questions --------------------------------------------------------------------------

    def _awake_size(self, gpu: GpuMemory, pids: set[int]) -> int | None:
        if self.config.wake_memory:
            return self.config.wake_memory
        if gpu.uuid in self.learned.awake:
            return self.learned.awake[gpu.uuid]
        return self._estimate_from_cmdline(gpu, pids)

    def _estimate_from_cmdline(self, gpu: GpuMemory, pids: set[int]) -> int | None:
        """Never seen awake: vLLM takes --gpu-memory-utilization (default 0.9) of the GPU."""
        for pid in sorted(pids):
            args = self._processes.cmdline(pid)
            if not any("vllm" in arg for arg in args):
                continue
            fraction = 0.9
            for i, arg in enumerate(args):
                if arg.startswith("--gpu-memory-utilization"):
                    value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
                    try:
                        fraction = float(value)
                    except ValueError:
                        pass
            return int(fraction * gpu.total)
        return None

    def wake_needs(self, gpu: GpuMemory, pids: set[int]) -> int | None:
        """Bytes the wake will map on ``gpu``; None when nothing tells."""
        holding = self.engine_holding(gpu, pids)
        awake = self._awake_size(gpu, pids)
        if awake is not None and holding is not None:
            return max(0, awake - holding)
        if awake is not None and self.config.wake_memory:
            return max(0, awake - self.learned.asleep.get(gpu.uuid, 0))
        # Seen from the device: the larger of what the last sleep freed and the last wake mapped.
        # Another process allocating during a sleep, or freeing during a wake, makes that one
        # reading too small; taking the larger needs both to be spoiled to under-estimate.
        seen = [known[gpu.uuid] for known in (self.learned.freed, self.learned.mapped)
                if gpu.uuid in known]
        if seen:
            return max(seen)
        if awake is not None:
            return max(0, awake - self.learned.asleep.get(gpu.uuid, 0))
        return None

    async def shortfall(self) -> Shortfall | None:
        """The first engine GPU without room for the wake, or None when every one has room."""
        try:
            gpus, pids = await self.read()
        except GpuUnavailable:
            return None
        for gpu in self.engine_gpus(gpus, pids):
            needs = self.wake_needs(gpu, pids)
            if needs is None:
                self._log.warning("wake_memory_unknown", gpu=gpu.index,
                                  hint="set AUTOSLEEPD_WAKE_MEMORY; waking without a memory check")
                continue
            needed = needs + self.config.wake_memory_margin if needs else 0
            if gpu.free < needed:
                others = sorted(((pid, used) for pid, used in gpu.processes.items() if pid not in pids),
                                key=lambda item: -item[1])
                return Shortfall(gpu, needed, tuple(others))
        if not pids:   # the wake goes now: what it maps shows in the next reading (learn)
            self._used_before_wake = {g.uuid: g.used for g in gpus}
        return None

    def host_ram(self) -> tuple[int, int | None]:
        """Host RAM available now, and the weights a level-1 sleep copies into it (if known)."""
        return (self._processes.host_available_bytes(),
                self.config.weights_memory or self.learned.weights_host)

    def level_for_sleep(self, level: int) -> tuple[int | None, str | None]:
        """The level to sleep at given host RAM: (level, None), (2, why) or (None, why)."""
        if level != 1:
            return level, None
        weights = self.config.weights_memory or self.learned.weights_host
        if not weights:
            return 1, None
        available = self._processes.host_available_bytes()
        if available >= weights + self.config.wake_memory_margin:
            return 1, None
        why = (f"host RAM has {gib(available)} available; a level-1 sleep copies "
               f"{gib(weights)} of weights into it")
        if self.config.level1_fallback == "level2":
            return 2, why
        return None, why

    def status(self) -> dict:
        learned = self.learned
        return {"gpus": [{"index": g.index, "uuid": g.uuid, "total_bytes": g.total,
                          "free_bytes": g.free} for g in self._last_gpus],
                # "process": NVML's per-process usage of the engine's processes; "device": whole-GPU
                # used memory around this sidecar's own sleeps and wakes (the processes are hidden).
                "attribution": self._attribution,
                "last_wake_mapped_bytes": learned.mapped,
                "wake_memory_override_bytes": self.config.wake_memory or None,
                "engine_awake_bytes": learned.awake, "engine_asleep_bytes": learned.asleep,
                "last_freed_bytes": learned.freed, "weights_host_bytes": learned.weights_host}
