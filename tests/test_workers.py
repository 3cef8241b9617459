"""Several worker processes in front of an engine (or two) (AUTOSLEEPD_WORKERS), whatever
AUTOSLEEPD_TEST_WORKERS says: the data path spread, the engine's state kept by the owner.

``only_workers`` closes the owner's own listener, so every new connection is accepted by a worker
(the listening socket lives on in them): what the test sees is what a worker does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import socket
from types import SimpleNamespace

import aiohttp
import psutil
import pytest

from autosleepd.clock import ManualClock
from autosleepd.config import Config
from autosleepd.control.states import State
from autosleepd.sim import SimSettings, SimulatedEngine, expected_text
from autosleepd.sim.gpu import SimGpu, SimProcesses
from autosleepd.sim.launcher import Launcher
from autosleepd.workers.gate import encode
from autosleepd.workers.owner import _Link

from .conftest import FakeEngine, completion, eventually, reap, settle
from .test_reliability import SimProcess

WORKERS = 3


def only_workers(server) -> None:
    server._listener.close()


async def fresh(url: str, method: str, path: str, **kwargs) -> tuple[int, dict, dict]:
    """One request on its own connection (so each may land on another process)."""
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url + path, **kwargs) as response:
            return response.status, dict(response.headers), await response.json(content_type=None)


async def stream_while(url: str, tokens: int, start) -> tuple[bytes, asyncio.Task]:
    """A stream of ``tokens``; once under way (on a worker), ``start()`` runs as a task beside
    it. Returns the stream's whole body, and the task."""
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/completions",
                             json=completion("long", tokens, stream=True)) as response:
            await response.content.readline()
            task = asyncio.create_task(start())
            return await response.read(), task


async def test_workers_answer_a_burst_while_asleep_with_one_wake(make_sim, make_proxy):
    sim = await make_sim(wake_seconds=0.2)
    server = await make_proxy(sim.url, workers=WORKERS)
    await server.supervisor.order_sleep(1)
    only_workers(server)
    results = await asyncio.gather(*(fresh(server.url, "POST", "/v1/completions",
                                           json=completion(f"request {i}", 3)) for i in range(60)))
    for i, (status, _, body) in enumerate(results):
        assert status == 200, body
        assert body["choices"][0]["text"] == expected_text(f"request {i}", 3)
    assert sim.stats.calls["/wake_up"] == 1 and sim.stats.violations == {}
    await eventually(lambda: server.supervisor.admission.in_flight == 0, what="all released")


async def test_a_stopped_engine_holds_workers_requests_in_the_owner_and_starts_once(make_proxy):
    """The stop rung is asleep to a worker: its requests wait in the owner's queue, one start."""
    engine = SimulatedEngine(SimSettings())   # down: stopped before autosleepd started
    launcher = Launcher(engine)
    await launcher.open()
    try:
        rung = Config.from_env({"AUTOSLEEPD_LADDER": "5m:1,1h:stop",
                                "AUTOSLEEPD_ENGINE_STOP_COMMAND": launcher.command("stop"),
                                "AUTOSLEEPD_ENGINE_START_COMMAND": launcher.command("start")})
        server = await make_proxy(engine.url, wait_ready=False, gpu=SimGpu(),
                                  processes=SimProcesses(engine), workers=WORKERS,
                                  **{name: getattr(rung, name) for name in (
                                      "ladder", "idle_timeout", "sleep_level", "stop_command",
                                      "start_command")})
        await server.supervisor.wait_for(State.STOPPED, timeout=5)
        only_workers(server)
        launcher.gate.clear()   # a slow load: every request arrives while it starts
        asks = [asyncio.create_task(fresh(server.url, "POST", "/v1/completions",
                                          json=completion(f"user {i}")))
                for i in range(12)]
        await eventually(lambda: server.supervisor.admission.queued == 12, what="all 12 held")
        assert server.supervisor.state in (State.STOPPED, State.LAUNCHING)
        launcher.gate.set()
        results = await asyncio.gather(*asks)
        assert [status for status, _, _ in results] == [200] * 12
        assert [body["choices"][0]["text"] for _, _, body in results] == [
            expected_text(f"user {i}", 4) for i in range(12)]
        assert launcher.starts == 1 and engine.stats.violations == {}
    finally:
        await launcher.close()


async def test_workers_route_by_model_and_each_engine_keeps_its_own_admission(make_proxy):
    """Two engines behind one port: a worker has a gate per engine (one segment each), so a burst
    for each model, both asleep, wakes each engine once, and one sleeping never holds the other."""
    sims = [SimulatedEngine(SimSettings(model=model, wake_seconds=0.2)) for model in ("big", "small")]
    for sim in sims:
        await sim.start()
    try:
        server = await make_proxy(sims[0].url, workers=WORKERS,
                                  engines=(("big", sims[0].url), ("small", sims[1].url)))
        await eventually(lambda: all(e.models.names for e in server.host.engines), what="names")
        big, small = server.host.engines
        await big.supervisor.order_sleep(1)
        await small.supervisor.order_sleep(1)
        only_workers(server)
        results = await asyncio.gather(*(
            fresh(server.url, "POST", "/v1/completions",
                  json={**completion(f"request {i}", 3), "model": ("big", "small")[i % 2]})
            for i in range(24)))
        for i, (status, _, body) in enumerate(results):
            assert status == 200 and body["model"] == ("big", "small")[i % 2], body
            assert body["choices"][0]["text"] == expected_text(f"request {i}", 3)
        assert [sim.stats.calls["/wake_up"] for sim in sims] == [1, 1]
        assert all(sim.stats.violations == {} for sim in sims)
        await small.supervisor.order_sleep(1)   # the small one asleep: the big one's work flows
        status, _, body = await fresh(server.url, "POST", "/v1/completions",
                                      json={**completion("still awake", 3), "model": "big"})
        assert status == 200 and small.supervisor.state is State.ASLEEP
        assert sims[1].stats.calls["/wake_up"] == 1
    finally:
        for sim in sims:
            await sim.close()


async def test_the_queue_bound_holds_across_workers(make_sim, make_proxy):
    sim = await make_sim(wake_seconds=1.0)
    server = await make_proxy(sim.url, workers=WORKERS, max_queue=5)
    await server.supervisor.order_sleep(1)
    only_workers(server)
    results = await asyncio.gather(*(fresh(server.url, "POST", "/v1/completions", json=completion())
                                     for _ in range(20)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 5 + [503] * 15
    refused = [body for status, _, body in results if status == 503]
    assert all(body["error"]["code"] == "queue_full" for body in refused)
    assert all("AUTOSLEEPD_MAX_QUEUE=5" in body["error"]["message"] for body in refused)


async def test_a_hold_timeout_in_a_worker_answers_503_with_the_owners_reason(make_sim, make_proxy):
    sim = await make_sim(wake_seconds=5.0)
    server = await make_proxy(sim.url, workers=WORKERS, wake_timeout=0.5)
    await server.supervisor.order_sleep(1)
    only_workers(server)
    status, headers, body = await fresh(server.url, "POST", "/v1/completions", json=completion())
    assert status == 503 and body["error"]["code"] == "wake_timeout"
    assert "did not wake within 0.5s" in body["error"]["message"] and "Retry-After" in headers


async def test_the_engine_never_sees_a_request_asleep_while_workers_race_the_idle_sleep(
        make_sim, make_proxy):
    """An idle window of 20 ms: rounds of requests at random moments, each round after a pause
    long enough to sleep, so the first requests of a round race the sleep decision."""
    sim = await make_sim()
    server = await make_proxy(sim.url, workers=WORKERS, idle_timeout=0.02)
    only_workers(server)
    rng = random.Random(14)
    statuses = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one(i: int) -> int:
            await asyncio.sleep(rng.uniform(0, 0.06))
            async with http.post(server.url + "/v1/completions", json=completion(str(i), 1)) as response:
                return response.status

        # At least 15 rounds, and on a loaded machine (where pauses stretch and the engine
        # sleeps less often) more, until the race has run five times: at most 150.
        rounds = 0
        while rounds < 15 or (sim.stats.calls["/sleep"] < 5 and rounds < 150):
            statuses += await asyncio.gather(*(one(i) for i in range(12)))
            await asyncio.sleep(rng.uniform(0.03, 0.12))
            rounds += 1
    assert statuses == [200] * len(statuses)
    print(f"{sim.stats.calls['/sleep']} sleeps")
    assert sim.stats.calls["/sleep"] >= 5, "the race was not run: the engine seldom slept"
    assert sim.stats.violations == {}


async def test_a_killed_worker_is_restarted_and_its_requests_no_longer_count(make_sim, make_proxy):
    sim = await make_sim(token_seconds=0.05)
    server = await make_proxy(sim.url, workers=WORKERS, idle_timeout=0.3)
    only_workers(server)
    shared = server.workers.shared[0]   # the one engine's segment

    async def stream(n: int) -> None:
        try:
            await fresh(server.url, "POST", "/v1/completions", json=completion(str(n), 200))
        except aiohttp.ClientError:
            pass   # the killed worker's clients lose their connection

    streams = [asyncio.create_task(stream(n)) for n in range(8)]
    await eventually(lambda: shared.in_flight() == 8, what="eight streams in flight")
    # the worker with the most of them (the kernel spreads connections unevenly)
    victim = max(server.workers.links.values(), key=lambda link: shared.counted(link.slot))
    assert shared.counted(victim.slot) > 0
    pid, slot = victim.process.pid, victim.slot
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: server.workers.links[slot].process.pid != pid, timeout=10,
                     what="the worker restarted")
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    await eventually(lambda: shared.in_flight() == 0, what="nothing counted in flight")
    await server.supervisor.wait_for(State.ASLEEP, timeout=10)   # idle again: it sleeps
    status, _, body = await fresh(server.url, "POST", "/v1/completions", json=completion())
    assert status == 200 and sim.stats.violations == {}
    status, _, body = await fresh(server.url, "GET", "/autosleepd/status")
    assert body["workers"] == {"processes": WORKERS, "exits": 1}
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/autosleepd/metrics") as response:
            assert "autosleepd_worker_exits_total 1.0" in await response.text()


async def test_admin_endpoints_through_a_worker_keep_the_token(make_sim, make_proxy):
    sim = await make_sim()
    server = await make_proxy(sim.url, workers=WORKERS, admin_token="s3cret")
    only_workers(server)
    status, _, body = await fresh(server.url, "GET", "/autosleepd/status")
    assert status == 200 and body["state"] == "awake"
    status, _, body = await fresh(server.url, "POST", "/autosleepd/sleep")
    assert status == 401 and body["error"]["code"] == "bad_token"
    status, _, _ = await fresh(server.url, "POST", "/autosleepd/sleep",
                               headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and sim.sleeping


async def test_metrics_count_what_every_worker_relayed(make_sim, make_proxy):
    sim = await make_sim()
    server = await make_proxy(sim.url, workers=WORKERS)
    only_workers(server)
    for _ in range(3):
        await asyncio.gather(*(fresh(server.url, "POST", "/v1/completions", json=completion())
                               for _ in range(10)))
        await fresh(server.url, "GET", "/v1/models")
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/autosleepd/metrics") as response:
            text = await response.text()
    assert 'autosleepd_requests_total{code="2xx",kind="work"} 30.0' in text
    assert 'autosleepd_requests_total{code="2xx",kind="passive"} 3.0' in text


async def test_shutdown_lets_a_workers_stream_finish_and_answers_its_held_requests(
        make_sim, make_proxy):
    sim = await make_sim(token_seconds=0.02)
    streaming = await make_proxy(sim.url, workers=WORKERS)
    only_workers(streaming)
    body, stopped = await stream_while(streaming.url, 40, streaming.shutdown)
    await stopped
    assert body.rstrip().endswith(b"data: [DONE]"), "the stream was cut by the shutdown"

    asleep = await make_sim(wake_seconds=5.0)
    holding = await make_proxy(asleep.url, workers=WORKERS)
    await holding.supervisor.order_sleep(1)
    only_workers(holding)
    held = asyncio.create_task(fresh(holding.url, "POST", "/v1/completions", json=completion()))
    await eventually(lambda: holding.supervisor.admission.queued == 1, what="the request held")
    await holding.shutdown()
    status, headers, body = await held
    assert status == 503 and body["error"]["code"] == "shutting_down" and "Retry-After" in headers


async def test_a_sleep_ordered_during_a_workers_stream_waits_for_it_to_end(make_sim, make_proxy):
    sim = await make_sim(token_seconds=0.01)
    server = await make_proxy(sim.url, workers=WORKERS)
    only_workers(server)
    body, sleeping = await stream_while(server.url, 30, lambda: server.supervisor.order_sleep(1))
    async with asyncio.timeout(2):
        await sleeping
    assert body.rstrip().endswith(b"data: [DONE]") and sim.sleeping
    assert sim.stats.violations == {}


async def test_an_engine_down_when_a_worker_connects_holds_the_request_until_it_is_back(make_proxy):
    sim = SimProcess()
    await sim.start()
    try:
        server = await make_proxy(sim.url, workers=WORKERS)
        only_workers(server)
        await sim.kill()
        later = asyncio.create_task(fresh(server.url, "POST", "/v1/completions",
                                          json=completion("after the crash")))
        await server.supervisor.wait_for(State.UNAVAILABLE, timeout=10)   # the worker told the owner
        assert not later.done()
        await sim.start()   # same port
        status, _, body = await asyncio.wait_for(later, 30)
        assert status == 200 and body["choices"][0]["text"] == expected_text("after the crash", 4)
    finally:
        await reap([sim.process])


async def test_workers_of_a_killed_owner_stop_and_free_the_port(make_sim, start_daemon):
    sim = await make_sim()
    daemon = await start_daemon(sim.url, AUTOSLEEPD_WORKERS=str(WORKERS))
    workers = psutil.Process(daemon.process.pid).children()
    assert len(workers) == WORKERS - 1
    daemon.process.kill()
    await daemon.process.wait()
    gone, alive = await asyncio.to_thread(psutil.wait_procs, workers, timeout=10)
    assert not alive, "workers outlived their owner"
    with pytest.raises(OSError):   # nothing listens any more
        await asyncio.open_connection("127.0.0.1", daemon.port)



@pytest.mark.parametrize("last_words", ["release", "hold"])
async def test_what_a_dead_worker_said_last_is_not_counted_after_its_work_was_written_off(
        supervisors, last_words):
    """A worker's exit can be handled before its last messages are read (both arrive in one
    loop turn): a late release must not count a second time what the write-off released, nor
    a late hold admit work that nobody will release (the engine would never sleep)."""
    supervisor = await supervisors(dataclasses.replace(Config(), idle_timeout=300.0), FakeEngine(),
                                   ManualClock())
    await supervisor.wait_for(State.AWAKE, timeout=5)
    owner = SimpleNamespace(engines=[SimpleNamespace(supervisor=supervisor)])
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=mine)
    link = _Link(owner, 0, None, reader, writer)
    await supervisor.admit()                 # the worker's one request in flight
    link.admitted[0] += 1
    message = ({"op": "release", "engine": 0, "id": 1} if last_words == "release"
               else {"op": "hold", "engine": 0, "id": 2, "wait": None})
    with theirs:                             # its last words, read but not yet handled
        theirs.sendall(encode(message))
        await eventually(lambda: len(reader._buffer) > 0, what="the words read")
    link.write_off()                         # its exit, handled first
    await asyncio.wait_for(link.serve(), 5)  # then what it said, up to the end of the link
    await settle()
    assert supervisor.admission.in_flight == 0 and link.admitted == [0] and not link.holds
