"""Fixtures: real simulators and real autosleepd instances on loopback, and small helpers."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import sys
from typing import Callable

import aiohttp
import pytest

from autosleepd import log
from autosleepd.config import Config
from autosleepd.gpu.readers import GpuMemory, GpuUnavailable
from autosleepd.server import Autosleepd
from autosleepd.sim import SimSettings, SimulatedEngine
from autosleepd.control.states import State
from autosleepd.control.supervisor import Supervisor

log.configure("warning", "json")

# AUTOSLEEPD_TEST_WORKERS=N runs every autosleepd the tests start with N worker processes (the
# Makefile's test target runs the suite with 1 and with 2). Tests that read one process's
# internals are marked ``single_process`` and keep one.
TEST_WORKERS = int(os.environ.get("AUTOSLEEPD_TEST_WORKERS", "1"))


class FakeEngine:
    """An engine at the edge of the supervisor: records calls, fails or blocks on request."""

    def __init__(self, sleeping: bool = False, level: int | None = None):
        self.sleeping = sleeping
        self.level = level if sleeping else None
        self.calls: list[tuple] = []
        self.failures: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.gates: dict[str, asyncio.Event] = {}
        self.answer: tuple = (1, 2, 3)   # the fingerprint's token ids

    def fail(self, op: str, error: Exception, times: int = 1) -> None:
        self.failures[op].extend([error] * times)

    def block(self, op: str) -> asyncio.Event:
        gate = self.gates[op] = asyncio.Event()
        return gate

    async def _enter(self, op: str, *args) -> None:
        self.calls.append((op, *args))
        if op in self.gates:
            await self.gates.pop(op).wait()
        if self.failures[op]:
            raise self.failures[op].popleft()

    async def is_sleeping(self, timeout: float = 5.0) -> bool:
        await self._enter("is_sleeping")
        return self.sleeping

    async def sleep_level(self, timeout: float = 5.0) -> int | None:
        await self._enter("sleep_level")
        return self.level

    async def sleep(self, level: int, timeout: float) -> None:
        await self._enter("sleep", level)
        self.sleeping, self.level = True, level

    async def wake(self, level: int, timeout: float, on_step=None) -> None:
        await self._enter("wake", level)
        self.sleeping, self.level = False, None

    async def fingerprint(self, timeout: float) -> tuple:
        await self._enter("fingerprint")
        return self.answer

    async def check_inference(self, timeout: float) -> None:
        await self._enter("check_inference")

    def count(self, op: str) -> int:
        return sum(1 for call in self.calls if call[0] == op)


async def reap(processes) -> None:
    """Kill what a test left running."""
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.fixture
async def supervisors():
    """Start supervisors whose control loops run for the test, and stop them after it."""
    made = []

    async def start(config, engine, clock, **parts) -> Supervisor:
        supervisor = Supervisor(config, engine, clock, **parts)
        made.append((supervisor, asyncio.create_task(supervisor.run())))
        await settle()
        return supervisor

    yield start
    for supervisor, task in made:
        supervisor.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def eventually(predicate: Callable[[], object], timeout: float = 5.0,
                     what: str = "condition") -> None:
    """Poll ``predicate`` until it holds, failing after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.002)


async def settle() -> None:
    """Let every ready task run (the fake engine answers at once, so a few turns suffice)."""
    for _ in range(50):
        await asyncio.sleep(0)


class NoGpu:
    """A host without NVML, whatever the machine running the tests has."""

    def read(self):
        raise GpuUnavailable("no GPU in this test")


class OneGpu:
    """One 80 GiB GPU whose use follows the simulated engine: 70 GiB awake, 2 GiB asleep."""

    def __init__(self, sim):
        self._sim = sim

    def read(self):
        used = (2 if self._sim.sleeping else 70) * 2**30
        return [GpuMemory(0, "GPU-sim", 80 * 2**30, used)]


@pytest.fixture
async def make_sim():
    sims: list[SimulatedEngine] = []

    async def make(**settings) -> SimulatedEngine:
        sim = SimulatedEngine(SimSettings(**settings))
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.close()


def workers_for(request, manual_clock: bool = False) -> int:
    """One process for tests marked so, and under a ManualClock (a worker's times are the real
    monotonic clock's)."""
    if request.node.get_closest_marker("single_process") or manual_clock:
        return 1
    return TEST_WORKERS


@pytest.fixture
async def make_proxy(request):
    servers: list[Autosleepd] = []

    async def make(upstream: str, wait_ready: bool = True, gpu=None, processes=None,
                   restart=None, clock=None, **overrides) -> Autosleepd:
        defaults = dict(upstream=upstream, host="127.0.0.1", port=0, idle_timeout=0,
                        wake_timeout=10.0, probe_interval=30.0,
                        workers=workers_for(request, clock is not None))
        server = Autosleepd(dataclasses.replace(Config(), **{**defaults, **overrides}),
                            gpu=gpu or NoGpu(), processes=processes, restart=restart, clock=clock)
        await server.start()
        servers.append(server)
        if wait_ready:
            for engine in server.host.engines:
                await engine.supervisor.wait_for(State.AWAKE, State.ASLEEP, timeout=5)
        return server

    yield make
    for server in servers:
        if server.supervisor.closing:   # the test shut it down itself
            continue
        if server._control.done():   # the control loop must never die
            raise AssertionError(f"the control loop ended: {server._control!r}")
        await server.shutdown()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


def completion(prompt: str = "hello world", max_tokens: int = 4, stream: bool = False) -> dict:
    return {"model": "sim-model", "prompt": prompt, "max_tokens": max_tokens, "stream": stream}


async def post_completion(http: aiohttp.ClientSession, base: str, prompt: str = "hello world",
                          max_tokens: int = 4) -> tuple[int, dict]:
    async with http.post(base + "/v1/completions", json=completion(prompt, max_tokens)) as response:
        return response.status, await response.json()


class Daemon:
    def __init__(self, process: asyncio.subprocess.Process, port: int):
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[dict] = []

    async def read_log_until_exit(self) -> int:
        async for raw in self.process.stderr:
            self.lines.append(json.loads(raw))
        return await self.process.wait()


@pytest.fixture
async def start_daemon(request):
    started: list[Daemon] = []

    async def start(upstream: str, **env) -> Daemon:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTOSLEEPD_")}
        environ.update({"AUTOSLEEPD_UPSTREAM": upstream, "AUTOSLEEPD_HOST": "127.0.0.1",
                        "AUTOSLEEPD_PORT": "0", "AUTOSLEEPD_LOG_FORMAT": "json",
                        "AUTOSLEEPD_WORKERS": str(workers_for(request)), **env})
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "autosleepd", env=environ, stderr=asyncio.subprocess.PIPE)
        early = []
        async with asyncio.timeout(30):
            while True:
                early.append(json.loads(await process.stderr.readline()))
                if early[-1]["event"] == "listening":
                    break
        daemon = Daemon(process, early[-1]["port"])
        daemon.lines.extend(early)
        started.append(daemon)
        return daemon

    yield start
    await reap(daemon.process for daemon in started)


async def wait_state(http, daemon: Daemon, state: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            async with http.get(daemon.url + "/autosleepd/status") as response:
                if (await response.json())["state"] == state:
                    return
            await asyncio.sleep(0.01)
