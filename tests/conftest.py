"""Fixtures: real simulators and real autosleepd instances on loopback, and small helpers."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Callable

import aiohttp
import pytest

from autosleepd import log
from autosleepd.config import Config
from autosleepd.server import Autosleepd
from autosleepd.sim import SimSettings, SimulatedEngine
from autosleepd.supervisor import State

log.configure("warning", "json")


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


@pytest.fixture
async def make_proxy():
    servers: list[Autosleepd] = []

    async def make(upstream: str, wait_ready: bool = True, **overrides) -> Autosleepd:
        defaults = dict(upstream=upstream, host="127.0.0.1", port=0, idle_timeout=0,
                        wake_timeout=10.0, probe_interval=30.0)
        server = Autosleepd(dataclasses.replace(Config(), **{**defaults, **overrides}))
        await server.start()
        servers.append(server)
        if wait_ready:
            await server.supervisor.wait_for(State.AWAKE, State.ASLEEP, timeout=5)
        return server

    yield make
    for server in servers:
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
