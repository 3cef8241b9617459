"""Reliability with real processes: a simulator process and an autosleepd process on loopback,
killed, restarted, starved and flooded. Nothing may be lost and autosleepd must stay up."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys

import aiohttp
import psutil
import pytest

from autosleepd.sim import expected_text

from .conftest import completion, post_completion, reap, wait_state


class SimProcess:
    """``autosleepd sim`` in its own process, killed with SIGKILL like a crashed vLLM."""

    def __init__(self, *args: str):
        self.args = args
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "autosleepd", "sim", "--port", str(self.port), *self.args,
            stdout=asyncio.subprocess.PIPE)
        line = (await asyncio.wait_for(self.process.stdout.readline(), 30)).decode()
        self.port = int(line.rsplit(":", 1)[1])

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stats(self, http) -> dict:
        async with http.get(self.url + "/sim/stats") as response:
            return await response.json()

    async def fault(self, http, **spec) -> None:
        async with http.post(self.url + "/sim/fault", json=spec) as response:
            assert response.status == 200


@pytest.fixture
async def running(sim_process, start_daemon, http):
    """A simulator process, and an autosleepd process in front of it that has found it awake."""

    async def start(*sim_args: str, **env: str):
        sim = await sim_process(*sim_args)
        daemon = await start_daemon(sim.url, **env)
        await wait_state(http, daemon, "awake")
        return sim, daemon

    return start


@pytest.fixture
async def sim_process():
    made: list[SimProcess] = []

    async def start(*args: str) -> SimProcess:
        sim = SimProcess(*args)
        await sim.start()
        made.append(sim)
        return sim

    yield start
    await reap(sim.process for sim in made)


async def test_an_engine_killed_mid_stream_errors_the_stream_and_later_work_waits_for_it(running, http):
    sim, daemon = await running("--token", "20ms")
    async with http.post(daemon.url + "/v1/completions",
                         json=completion("doomed", 1000, stream=True)) as response:
        await response.content.readline()
        await sim.kill()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), 10)
    later = asyncio.create_task(post_completion(http, daemon.url, "after the crash"))
    await wait_state(http, daemon, "unavailable")
    await sim.start()   # same port
    status, body = await asyncio.wait_for(later, 30)
    assert status == 200 and body["choices"][0]["text"] == expected_text("after the crash", 4)
    assert daemon.process.returncode is None


@pytest.mark.parametrize("believed", ["asleep", "awake"])
async def test_an_engine_restarted_behind_autosleepd_s_back_is_served_correctly(running, http, believed):
    sim, daemon = await running()
    if believed == "asleep":
        async with http.post(daemon.url + "/autosleepd/sleep") as response:
            assert response.status == 200
    await sim.kill()
    await sim.start()   # a fresh engine: awake, whatever autosleepd believed
    status, body = await post_completion(http, daemon.url, "fresh")
    assert status == 200 and body["choices"][0]["text"] == expected_text("fresh", 4)
    assert (await sim.stats(http))["violation_total"] == 0


async def test_a_wake_that_hangs_past_the_engine_deadline_marks_the_engine_broken(running, http):
    sim, daemon = await running(AUTOSLEEPD_WAKE_TIMEOUT="500ms", AUTOSLEEPD_ENGINE_WAKE_TIMEOUT="1500ms")
    async with http.post(daemon.url + "/autosleepd/sleep") as response:
        assert response.status == 200
    await sim.fault(http, path="/wake_up", hang=True)
    async with http.post(daemon.url + "/v1/completions", json=completion()) as response:
        assert response.status == 503 and response.headers["Retry-After"]
        assert (await response.json())["error"]["code"] == "wake_timeout"
    await wait_state(http, daemon, "broken")   # slow is not broken; past the deadline it is
    async with http.get(daemon.url + "/autosleepd/engine-healthz") as response:
        assert response.status == 503
        assert "AUTOSLEEPD_ENGINE_WAKE_TIMEOUT" in (await response.json())["broken_reason"]
    async with http.get(sim.url + "/sim/stats") as response:
        assert (await response.json())["calls"]["/wake_up"] == 1


async def test_a_sleep_that_fails_leaves_the_engine_serving(running, http):
    sim, daemon = await running(AUTOSLEEPD_IDLE_TIMEOUT="200ms")
    await sim.fault(http, path="/sleep", times=1)
    assert (await post_completion(http, daemon.url))[0] == 200
    await wait_state(http, daemon, "asleep")   # the next idle window's sleep works
    async with http.get(daemon.url + "/autosleepd/status") as response:
        assert (await response.json())["sleep_failures"] == 1
    assert (await post_completion(http, daemon.url))[0] == 200


async def test_autosleepd_restarted_while_the_engine_sleeps_finds_it_asleep(running, start_daemon, http):
    sim, first = await running(AUTOSLEEPD_SLEEP_LEVEL="2")
    async with http.post(first.url + "/autosleepd/sleep") as response:
        assert response.status == 200
    first.process.kill()
    await first.process.wait()
    second = await start_daemon(sim.url)   # configured for level 1; the engine sleeps at 2
    await wait_state(http, second, "asleep")
    status, body = await post_completion(http, second.url, "woken by the second")
    assert status == 200 and body["choices"][0]["text"] == expected_text("woken by the second", 4)
    stats = await sim.stats(http)
    assert stats["violation_total"] == 0 and stats["garbage"] == 0
    assert stats["calls"]["/collective_rpc"] == 1   # it used the level-2 wake it read from vLLM


async def test_a_client_reading_one_byte_a_second_does_not_slow_the_others(running, http):
    _, daemon = await running()
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    body = json.dumps(completion("slow " * 50, 20000, stream=True)).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    await reader.readexactly(1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(*(post_completion(http, daemon.url, f"fast {i}") for i in range(50)))
    assert all(status == 200 for status, _ in results)
    assert loop.time() - started < 10
    await reader.readexactly(1)   # the slow client is still being served
    writer.close()


async def test_a_client_sending_its_body_slowly_is_served_and_others_are_not_held_up(running, http):
    _, daemon = await running()
    payload = json.dumps(completion("trickled in", 4)).encode()

    async def trickle():
        for i in range(0, len(payload), 8):
            yield payload[i:i + 8]
            await asyncio.sleep(0.05)   # the client's pace

    slow = asyncio.create_task(http.post(daemon.url + "/v1/completions", data=trickle(),
                                         headers={"Content-Type": "application/json"}))
    results = await asyncio.gather(*(post_completion(http, daemon.url, f"meanwhile {i}") for i in range(20)))
    assert all(status == 200 for status, _ in results)
    assert not slow.done(), "the slow upload should still be going"
    response = await slow
    assert (await response.json())["choices"][0]["text"] == expected_text("trickled in", 4)


async def test_a_thousand_idle_keep_alive_connections(running, http):
    _, daemon = await running()
    port = daemon.port
    connections = []
    for _ in range(1000):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        connections.append((reader, writer))
    for reader, _ in connections:
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    status, body = await post_completion(http, daemon.url, "still fine")
    assert status == 200 and body["choices"][0]["text"] == expected_text("still fine", 4)
    rss = psutil.Process(daemon.process.pid).memory_info().rss
    assert rss < 150 * 2**20, f"{rss / 2**20:.0f} MiB with 1000 idle connections"
    for _, writer in connections:
        writer.close()


@pytest.mark.parametrize("raw, expected", [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 20000 + b"\r\n\r\n", b"4"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", b"400"),
])
async def test_malformed_http_gets_a_4xx_and_autosleepd_stays_up(running, http, raw, expected):
    _, daemon = await running()
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(raw)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert status_line.split(b" ")[1].startswith(expected), status_line
    writer.close()
    assert (await post_completion(http, daemon.url))[0] == 200


async def test_bodies_over_the_limit_get_413_whether_their_length_is_known_or_not(running, http):
    _, daemon = await running(AUTOSLEEPD_MAX_BODY_SIZE="1KiB")
    async with http.post(daemon.url + "/sim/echo", data=b"x" * 2048) as response:
        assert response.status == 413
        assert "AUTOSLEEPD_MAX_BODY_SIZE" in (await response.json())["error"]["message"]

    async def chunked():
        for _ in range(4):
            yield b"y" * 512

    async with http.post(daemon.url + "/sim/echo", data=chunked()) as response:
        assert response.status == 413
    async with http.post(daemon.url + "/sim/echo", data=b"z" * 1000) as response:
        assert response.status == 200 and await response.read() == b"z" * 1000


async def test_invalid_json_is_passed_through_untouched(running, http):
    _, daemon = await running()
    broken = b'{"prompt": "unterminated, \xff\xfe bytes, \x00 and all'
    async with http.post(daemon.url + "/sim/echo", data=broken,
                         headers={"Content-Type": "application/json"}) as response:
        assert response.status == 200 and await response.read() == broken
    async with http.post(daemon.url + "/v1/completions", data=broken,
                         headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400   # vLLM's (the simulator's) verdict, not autosleepd's


async def test_soak_20_cycles_10000_requests_nothing_lost_nothing_left_behind(running, http):
    """20 sleep/wake cycles, steady and bursty traffic, random disconnects."""
    sim, daemon = await running("--wake", "50ms", "--sleep", "20ms",
                                AUTOSLEEPD_IDLE_TIMEOUT="100ms", AUTOSLEEPD_MAX_QUEUE="2000")
    process = psutil.Process(daemon.process.pid)
    rng = random.Random(7)
    sent = answered = abandoned = 0
    rss = []

    async def one(i: int) -> None:
        nonlocal answered, abandoned
        prompt = f"soak {i}"
        if rng.random() < 0.05:   # a client that gives up early
            task = asyncio.create_task(post_completion(http, daemon.url, prompt))
            await asyncio.sleep(rng.random() * 0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            abandoned += 1
            return
        status, body = await post_completion(http, daemon.url, prompt)
        assert status == 200 and body["choices"][0]["text"] == expected_text(prompt, 4), body
        answered += 1

    for cycle in range(20):
        await wait_state(http, daemon, "asleep", timeout=30)
        if cycle % 2:   # bursty: everything at once, into a sleeping engine
            await asyncio.gather(*(one(sent + i) for i in range(500)))
        else:           # steady: 25 waves of 20
            for wave in range(25):
                await asyncio.gather(*(one(sent + wave * 20 + i) for i in range(20)))
        sent += 500
        rss.append(process.memory_info().rss)

    assert sent == 10_000 and answered + abandoned == sent
    stats = await sim.stats(http)
    assert stats["violation_total"] == 0, stats["violations"]
    async with http.get(daemon.url + "/autosleepd/status") as response:
        status = await response.json()
    assert status["in_flight"] == 0 and status["queued"] == 0
    assert status["sleeps"] >= 20 and status["wakes"] >= 20
    growth = rss[-1] - rss[1]
    assert growth < 16 * 2**20, f"autosleepd grew {growth / 2**20:.1f} MiB between cycle 2 and 20"
    assert daemon.process.returncode is None


async def test_hostile_soak_idle_floods_slowloris_held_bodies_and_scanners_leave_nothing_behind(
        running, http):
    sim, daemon = await running("--wake", "300ms", AUTOSLEEPD_HEADER_TIMEOUT="500ms",
                                AUTOSLEEPD_KEEPALIVE_TIMEOUT="1s")
    process = psutil.Process(daemon.process.pid)
    start_rss = process.memory_info().rss
    async with http.post(daemon.url + "/autosleepd/sleep") as response:
        assert response.status == 200
    idle, slow = [], []
    for _ in range(300):   # a flood of connections that never send a request
        idle.append(await asyncio.open_connection("127.0.0.1", daemon.port))
    for _ in range(50):    # slowloris: headers begun, never finished
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append((reader, writer))
    for path in ("/", "/favicon.ico", "/robots.txt", "/.env", "/wp-login.php", "/.git/config"):
        async with http.get(daemon.url + path) as response:   # scanners
            assert response.status == 404
    async with http.post(daemon.url + "/%73leep") as response:
        assert response.status == 403
    assert (await sim.stats(http))["calls"].get("/wake_up", 0) == 0
    prompts = [f"large {i} " + "z" * 500_000 for i in range(40)]   # held while the engine wakes
    results = await asyncio.gather(*(post_completion(http, daemon.url, prompt, 2) for prompt in prompts))
    assert [body["choices"][0]["text"] for _, body in results] == [expected_text(p, 2) for p in prompts]
    for reader, writer in idle + slow:   # autosleepd closes every one of them
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    stats = await sim.stats(http)
    assert stats["violation_total"] == 0 and stats["calls"]["/wake_up"] == 1
    async with http.get(daemon.url + "/autosleepd/status") as response:
        status = await response.json()
    assert status["in_flight"] == 0 and status["queued"] == 0
    growth = process.memory_info().rss - start_rss
    assert growth < 40 * 2**20, f"autosleepd grew {growth / 2**20:.1f} MiB"
    assert daemon.process.returncode is None
