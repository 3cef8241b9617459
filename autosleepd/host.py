"""The engines behind one port: each with its own supervisor (the one owner of its state), engine
client, memory guard, proxy and coordination entry; and the host as a whole, which finds the
engine serving a model and describes every engine (``GET /autosleepd/host``).

Several engines in one process still evict each other through the coordination directory, as
separate sidecars do: the protocol is the same, so one host may mix both.
"""

from __future__ import annotations

import asyncio
import collections
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import structlog

from .clock import Clock
from .config import Config
from .control.engine import EngineClient, EngineError
from .control.restart import CommandRestarter, command_env
from .control.states import State
from .control.supervisor import Observer, Restarter, Supervisor
from .gpu.guard import MemoryGuard
from .gpu.neighbours import Coordinator
from .gpu.power import PowerMeter
from .gpu.readers import GpuReader, Processes
from .heap import HeapTrimmer
from .metrics import Metrics
from .policy.prewake import PrewakeLearner
from .proxy.relay import Target
from .proxy.upstream import Upstream

HISTORY_SECONDS = 24 * 3600.0   # the live page's timeline
HISTORY_LIMIT = 2000            # transitions kept per engine, however busy the day


class History(Observer):
    """Each engine's states over the last day, as (epoch seconds, state, reason); bounded."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self.entries: collections.deque = collections.deque([(clock.wall(), "starting", "start")],
                                                            maxlen=HISTORY_LIMIT)

    def transition(self, old: State, new: State, reason: str, seconds: float) -> None:
        now = self._clock.wall()
        self.entries.append((now, new.value, reason))
        while len(self.entries) > 1 and self.entries[1][0] < now - HISTORY_SECONDS:
            self.entries.popleft()   # the first kept entry is the state at the window's start

    def to_json(self) -> list[dict]:
        return [{"at": at, "state": state, "reason": reason} for at, state, reason in self.entries]


class ModelNames(Observer):
    """The names an engine serves, read from its /v1/models (answered asleep too, so reading
    never wakes it) at start and each time it is found or woken awake (a restarted engine may
    serve other names); the last good answer stays when the engine does not answer."""

    def __init__(self, client: EngineClient, name: str):
        self._client = client
        self._log = structlog.get_logger("autosleepd.host").bind(engine=name)
        self.names: tuple[str, ...] = ()
        self.on_change = None   # the host's check that no two engines claim one name
        self._task: asyncio.Task | None = None

    def transition(self, old: State, new: State, reason: str, seconds: float) -> None:
        if new is State.AWAKE:
            self.refresh()

    def refresh(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            names = tuple(await self._client.models())
        except EngineError as error:
            self._log.debug("models_unread", error=str(error))
            return
        if names != self.names:
            self._log.info("models_learned", models=list(names))
            self.names = names
            if self.on_change is not None:
                self.on_change()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class HostedEngine:
    """One engine and everything that serves it."""

    def __init__(self, name: str, config: Config, clock: Clock, gpu: GpuReader | None,
                 processes: Processes, restart: Restarter | None):
        self.name, self.config = name, config
        self._log = structlog.get_logger("autosleepd")
        self.client = EngineClient(config.upstream, config.connect_timeout, config.upstream_api_key)
        self.guard = MemoryGuard(config, gpu, processes) if gpu is not None else None
        self.metrics = Metrics()
        self.coordinator = None
        if config.coordination_dir:
            self.coordinator = Coordinator(config.coordination_dir, config.instance,
                                           request_timeout=config.sleep_timeout)
        if restart is None and config.restart_command:
            restart = CommandRestarter(config.restart_command,
                                       secrets=(config.upstream_api_key, config.admin_token),
                                       env=command_env(config))
        learner = None
        if config.prewake == "learned":
            learner = PrewakeLearner(ZoneInfo(config.timezone), lead=config.prewake_lead,
                                     path=Path(config.state_file) if config.state_file else None)
            if config.state_file is None:
                self._log.warning("prewake_state_in_memory", hint="set AUTOSLEEPD_STATE_FILE so "
                                  "what the pre-wake learned survives a restart")
        self.history = History(clock)
        self.models = ModelNames(self.client, name)
        self.supervisor = Supervisor(config, self.client, clock,
                                     observers=(self.metrics, self.history, self.models),
                                     guard=self.guard, neighbours=self.coordinator,
                                     restart=restart, learner=learner)
        self.power = None
        if self.guard is not None:
            # Engines sharing a GPU each see its whole draw: the board reads one number.
            self.power = PowerMeter(self.guard, clock, self.supervisor.idle_seconds)
            self.supervisor.power = self.power
            self.supervisor.add_observer(self.power)
        self.supervisor.add_observer(HeapTrimmer(lambda: self.supervisor.admission.idle))
        self.metrics.watch(self.supervisor.status,
                           self.coordinator.status if self.coordinator is not None else None,
                           self.supervisor.pins.to_json)
        # Where the relay sends this engine's requests: its connections, its gate, its metrics.
        self.target = Target(Upstream(config.upstream, connect_timeout=config.connect_timeout),
                             self.supervisor, self.metrics)
        self.control: asyncio.Task | None = None
        self._metering: asyncio.Task | None = None

    async def start(self) -> None:
        await self.client.start()
        if self.coordinator is not None:
            self.coordinator.prepare()
        self.models.refresh()

    async def serve(self, url: str) -> None:
        if self.coordinator is not None:
            await self.coordinator.serve(self.supervisor, url)
        if self.power is not None:
            self._metering = asyncio.create_task(self.power.run(), name=f"autosleepd-power-{self.name}")
        self.control = asyncio.create_task(self.supervisor.run(), name=f"autosleepd-control-{self.name}")

    async def stop(self) -> None:
        """After the drain: the control loop, the coordination entry, the clients."""
        for task in (self.control, self._metering):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.coordinator is not None:
            await self.coordinator.close()
        await self.models.close()
        await self.close_clients()

    async def close_clients(self) -> None:
        self.target.upstream.close()
        await self.client.close()

    def serves(self, model: str) -> bool:
        return model in self.models.names or model == self.name

    def view(self, history: bool = False) -> dict:
        """This engine in the host view."""
        status = self.supervisor.status()
        memory = status.memory or {}
        planned = status.to_json()["next_transition"]
        view = {
            "name": self.name, "upstream": self.config.upstream,
            "models": list(self.models.names) or [self.name],
            "state": status.state.value, "state_seconds": round(status.state_seconds, 1),
            "sleep_level": status.sleep_level if status.state is State.ASLEEP else None,
            "gpu_memory_awake_bytes": _total(memory.get("engine_awake_bytes")),
            "gpu_memory_asleep_bytes": _total(memory.get("engine_asleep_bytes")),
            "last_used": _iso(status.wall - status.idle_seconds),
            "idle_seconds": round(status.idle_seconds, 1),
            "in_flight": status.in_flight, "held": status.queued,
            "next_transition": planned,
            "pin": self.supervisor.pins.to_json(status.now),
            "keep_alive_seconds": self.supervisor.pins.keep_alive or None,
            "power": status.power,   # the draw of this engine's GPUs, energy per state, the saving
        }
        if history:
            view["history"] = self.history.to_json()
        return view


class Host:
    """Every engine behind the port, in the order configured (the first is the default)."""

    def __init__(self, engines: list[HostedEngine]):
        self.engines = engines
        self.by_name = {engine.name: engine for engine in engines}
        self.names_watchers: list = []   # told when an engine's model names change (workers)
        for engine in engines:
            engine.models.on_change = self._names_changed

    def _names_changed(self) -> None:
        self._check_names()
        for watcher in self.names_watchers:
            watcher()

    def _check_names(self) -> None:
        """A model two engines serve goes to the first listed: say so, once per change."""
        claimed: dict[str, list[str]] = {}
        for engine in self.engines:
            for name in set(engine.models.names) | {engine.name}:
                claimed.setdefault(name, []).append(engine.name)
        for model, engines in claimed.items():
            if len(engines) > 1:
                structlog.get_logger("autosleepd.host").warning(
                    "model_served_twice", model=model, engines=engines,
                    hint=f"requests for it go to {engines[0]}, the first listed in AUTOSLEEPD_ENGINES")

    @property
    def single(self) -> bool:
        return len(self.engines) == 1

    def find(self, model: str) -> HostedEngine | None:
        """The engine that serves ``model`` (a learned name first, then an engine's name)."""
        return (next((e for e in self.engines if model in e.models.names), None)
                or self.by_name.get(model))

    def model_names(self) -> list[str]:
        return [name for engine in self.engines for name in (engine.models.names or (engine.name,))]

    def models_list(self) -> dict:
        """GET /v1/models for the whole host, asleep or not, in OpenAI's shape."""
        data = [{"id": name, "object": "model", "owned_by": "vllm", "engine": engine.name,
                 "state": engine.supervisor.state.value}
                for engine in self.engines for name in (engine.models.names or (engine.name,))]
        return {"object": "list", "data": data}

    def view(self, history: bool = False) -> dict:
        return {"now": _iso(self.engines[0].supervisor.clock.wall()),
                "engines": [engine.view(history) for engine in self.engines]}


def _total(per_gpu: dict | None) -> int | None:
    return sum(per_gpu.values()) if per_gpu else None


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")
