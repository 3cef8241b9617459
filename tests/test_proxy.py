"""End to end on loopback: a real simulator, a real autosleepd, real HTTP clients."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from autosleepd.proxy.routes import CONTROL_PATHS
from autosleepd.sim import expected_text
from autosleepd.control.states import State

from .conftest import completion, eventually, post_completion


async def sleep_now(server) -> None:
    await server.supervisor.order_sleep(server.config.sleep_level)
    assert server.supervisor.state is State.ASLEEP


@pytest.mark.parametrize("behaviour", ["hang", "crash"])
async def test_a_burst_of_500_while_asleep_gets_one_wake_and_500_right_answers(
        make_sim, make_proxy, http, behaviour):
    sim = await make_sim(asleep_behaviour=behaviour, wake_seconds=0.2)
    server = await make_proxy(sim.url, max_queue=1024)
    await sleep_now(server)

    results = await asyncio.gather(*(post_completion(http, server.url, f"request {i}", 3)
                                     for i in range(500)))
    for i, (status, body) in enumerate(results):
        assert status == 200, body
        assert body["choices"][0]["text"] == expected_text(f"request {i}", 3)
    assert sim.stats.calls["/wake_up"] == 1
    assert sim.stats.violations == {}
    assert server.supervisor.admission.in_flight == 0 and server.supervisor.admission.queued == 0


async def test_level_two_wakes_with_the_reload_sequence_and_answers_right(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, sleep_level=2)
    await sleep_now(server)
    assert sim.level == 2
    status, body = await post_completion(http, server.url, "after level two")
    assert status == 200 and body["choices"][0]["text"] == expected_text("after level two", 4)
    assert sim.stats.calls["/collective_rpc"] == 1 and sim.stats.calls["/wake_up"] == 2
    assert sim.stats.violations == {} and sim.stats.garbage == 0


async def test_idle_sleep_happens_after_the_window_and_the_next_request_wakes(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, idle_timeout=0.2)
    assert (await post_completion(http, server.url))[0] == 200
    await server.supervisor.wait_for(State.ASLEEP, timeout=5)
    assert sim.sleeping and sim.stats.calls["/sleep"] == 1
    assert (await post_completion(http, server.url))[0] == 200
    assert not sim.sleeping and sim.stats.violations == {}


async def test_a_stream_that_outlives_the_idle_window_is_not_cut(make_sim, make_proxy, http):
    sim = await make_sim(token_seconds=0.02)
    server = await make_proxy(sim.url, idle_timeout=0.1)
    chunks = []
    async with http.post(server.url + "/v1/completions",
                         json=completion("long stream", 30, stream=True)) as response:
        async for line in response.content:
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[6:])["choices"][0]["text"])
            assert sim.stats.calls["/sleep"] == 0, "slept while the stream was running"
    assert "".join(chunks) == expected_text("long stream", 30)
    await server.supervisor.wait_for(State.ASLEEP, timeout=5)
    assert sim.stats.violations == {} and sim.stats.aborted_by_sleep == 0


async def test_streamed_chunks_reach_the_client_as_the_engine_writes_them(make_sim, make_proxy, http):
    sim = await make_sim(token_seconds=0.05)
    server = await make_proxy(sim.url)
    loop = asyncio.get_running_loop()
    arrivals = []
    async with http.post(server.url + "/v1/completions",
                         json=completion("a b c d e f", 6, stream=True)) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for line in response.content:
            if line.startswith(b"data: "):
                arrivals.append(loop.time())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:-1])]
    # Six tokens 50 ms apart: each arrives on its own, not in one block at the end.
    assert len(arrivals) == 7 and min(gaps) > 0.02


async def test_a_client_that_leaves_mid_stream_aborts_the_engine_request_and_lets_it_sleep(
        make_sim, make_proxy, http):
    sim = await make_sim(token_seconds=0.05)
    server = await make_proxy(sim.url, idle_timeout=0.2)
    response = await http.post(server.url + "/v1/completions",
                               json=completion("x", 1000, stream=True))
    await response.content.readline()
    response.close()   # the client goes away
    await eventually(lambda: sim.stats.aborted_by_client == 1, what="the engine to see the abort")
    await eventually(lambda: server.supervisor.admission.in_flight == 0)
    await server.supervisor.wait_for(State.ASLEEP, timeout=5)


async def test_a_client_that_leaves_while_held_does_not_keep_the_engine_awake(make_sim, make_proxy, http):
    sim = await make_sim(wake_seconds=0.5)
    server = await make_proxy(sim.url, idle_timeout=0.2)
    await sleep_now(server)
    request = asyncio.create_task(post_completion(http, server.url))
    await eventually(lambda: server.supervisor.admission.queued == 1)
    request.cancel()
    await eventually(lambda: server.supervisor.admission.queued == 0, what="the held client to leave")
    # The wake it started completes; then the engine goes back to sleep after the window.
    await server.supervisor.wait_for(State.AWAKE, timeout=5)
    await server.supervisor.wait_for(State.ASLEEP, timeout=5)
    assert server.supervisor.admission.in_flight == 0 and sim.stats.violations == {}


async def test_requests_arriving_during_a_slow_sleep_are_served_after_one_wake(make_sim, make_proxy, http):
    sim = await make_sim(sleep_seconds=0.5)
    server = await make_proxy(sim.url, idle_timeout=0.05)
    await server.supervisor.wait_for(State.FALLING_ASLEEP, timeout=5)
    results = await asyncio.gather(*(post_completion(http, server.url, f"late {i}") for i in range(20)))
    assert all(status == 200 and body["choices"][0]["text"] == expected_text(f"late {i}", 4)
               for i, (status, body) in enumerate(results))
    assert sim.stats.calls["/sleep"] == 1 and sim.stats.calls["/wake_up"] == 1
    assert sim.stats.violations == {}


@pytest.mark.parametrize("path", sorted(CONTROL_PATHS))
async def test_every_vllm_control_endpoint_is_refused(make_sim, make_proxy, http, path):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    before = sim.stats.calls[path]   # autosleepd's own probe reads /is_sleeping
    for method in ("POST", "GET"):
        async with http.request(method, server.url + path + "?level=2") as response:
            assert response.status == 403
            assert (await response.json())["error"]["code"] == "blocked_path"
    assert sim.stats.calls[path] == before


@pytest.mark.parametrize("spelling", ["//sleep", "/sleep/", "/./sleep", "/v1/../sleep",
                                      "/%73leep", "//wake_up//"])
async def test_other_spellings_of_a_control_path_are_refused_too(make_sim, make_proxy, http, spelling):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    url = aiohttp.client.URL(server.url + spelling, encoded=True)
    async with http.post(url) as response:
        assert response.status == 403
    assert sim.stats.calls["/sleep"] == sim.stats.calls["/wake_up"] == 0
    assert server.supervisor.state is State.AWAKE


async def test_passive_traffic_neither_prevents_sleep_nor_wakes(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, idle_timeout=0.3)
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.0   # more than three idle windows of health checks and scrapes
    while loop.time() < end:
        for path in ("/health", "/metrics", "/v1/models", "/version", "/load", "/ping"):
            async with http.get(server.url + path) as response:
                assert response.status == 200
        await asyncio.sleep(0.02)   # the pace of the traffic, not a wait for a condition
    assert server.supervisor.state is State.ASLEEP
    assert sim.stats.calls["/wake_up"] == 0 and sim.stats.violations == {}


async def test_headers_and_bodies_pass_through_and_hop_by_hop_headers_do_not(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    seen = {}

    async def capture(request):
        seen.update(request.headers)
        return aiohttp.web.Response(status=201, body=await request.read(),
                                    headers={"X-Upstream": "yes", "Keep-Alive": "timeout=5"})

    sim._routes = lambda: {("PUT", "/echo"): capture}
    body = b"\x00binary body\xff" * 1000
    async with http.put(server.url + "/echo?q=1", data=body,
                        headers={"X-Custom": "kept", "Proxy-Authorization": "secret",
                                 "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "gone"}) as response:
        assert response.status == 201
        assert await response.read() == body
        assert response.headers["X-Upstream"] == "yes" and "Keep-Alive" not in response.headers
    assert seen["X-Custom"] == "kept" and seen["X-Forwarded-For"] == "127.0.0.1"
    assert "Proxy-Authorization" not in seen and "X-Drop-Me" not in seen
    assert seen["Content-Length"] == str(len(body))


async def test_a_request_body_is_streamed_to_the_engine_not_buffered(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    first_chunk_seen = asyncio.Event()
    received = []

    async def upload(request):
        async for chunk in request.content.iter_any():
            received.append(chunk)
            first_chunk_seen.set()
        return aiohttp.web.Response(text=str(sum(map(len, received))))

    sim._routes = lambda: {("POST", "/upload"): upload}

    async def body():
        yield b"first part "
        await asyncio.wait_for(first_chunk_seen.wait(), 5)   # the engine has it before the end
        yield b"second part"

    async with http.post(server.url + "/upload", data=body()) as response:
        assert await response.text() == str(len(b"first part second part"))


async def test_the_engine_s_own_errors_pass_through_untouched(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    async with http.post(server.url + "/v1/completions", data=b"{not json",
                         headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
        assert "invalid request" in (await response.json())["error"]["message"]
    async with http.get(server.url + "/no/such/path") as response:
        assert response.status == 404


async def test_past_the_queue_limit_the_client_gets_503_with_retry_after(make_sim, make_proxy, http):
    sim = await make_sim(wake_seconds=1.0)
    server = await make_proxy(sim.url, max_queue=2)
    await sleep_now(server)
    held = [asyncio.create_task(post_completion(http, server.url)) for _ in range(2)]
    await eventually(lambda: server.supervisor.admission.queued == 2)
    async with http.post(server.url + "/v1/completions", json=completion()) as response:
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        error = (await response.json())["error"]
        assert error["code"] == "queue_full" and "AUTOSLEEPD_MAX_QUEUE" in error["message"]
    assert [status for status, _ in await asyncio.gather(*held)] == [200, 200]


async def test_a_wake_slower_than_the_hold_goes_on_and_the_next_request_finds_it_done(make_sim, make_proxy, http):
    sim = await make_sim(wake_seconds=0.6)
    server = await make_proxy(sim.url, wake_timeout=0.4)
    await sleep_now(server)
    async with http.post(server.url + "/v1/completions", json=completion()) as response:
        assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
        assert (await response.json())["error"]["code"] == "wake_timeout"
    # The wake went on without that client: the next request waits for the same one.
    assert (await post_completion(http, server.url))[0] == 200
    assert sim.stats.calls["/wake_up"] == 1, "never a second /wake_up while one runs"
    assert server.supervisor.state is State.AWAKE and server.supervisor.stats.broken_reason is None
    assert sim.stats.violations == {}


async def test_a_level_two_reload_slower_than_the_hold_runs_once_and_is_not_broken(make_sim, make_proxy, http):
    sim = await make_sim(reload_seconds=0.5)
    server = await make_proxy(sim.url, wake_timeout=0.2, sleep_level=2)
    await sleep_now(server)
    statuses = []
    for _ in range(3):   # clients give up one after another while the reload runs
        async with http.post(server.url + "/v1/completions", json=completion()) as response:
            statuses.append(response.status)
    await server.supervisor.wait_for(State.AWAKE, timeout=5)
    assert sim.stats.calls["/collective_rpc"] == 1, "never a second reload_weights"
    assert (await post_completion(http, server.url))[0] == 200
    assert server.supervisor.stats.broken_reason is None and sim.stats.violations == {}


async def test_a_failed_wake_is_retried_and_the_request_served(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    await sleep_now(server)
    sim.fail_next("/wake_up", times=2)
    status, body = await post_completion(http, server.url, "retried")
    assert status == 200 and body["choices"][0]["text"] == expected_text("retried", 4)
    assert sim.stats.calls["/wake_up"] == 3 and server.supervisor.stats.wake_failures == 2


async def test_an_unreachable_engine_gives_502_after_the_timeout(make_proxy, http):
    server = await make_proxy("http://127.0.0.1:9", wake_timeout=0.3, wait_ready=False)
    async with http.post(server.url + "/v1/completions", json=completion()) as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "engine_unavailable"
    async with http.get(server.url + "/autosleepd/healthz") as response:
        assert response.status == 200


async def test_a_passive_request_to_a_down_engine_gets_a_clean_502(make_proxy, http):
    server = await make_proxy("http://127.0.0.1:9", wait_ready=False)
    async with http.get(server.url + "/health") as response:
        assert response.status == 502 and response.headers["Retry-After"] == "5"
        error = (await response.json())["error"]
        assert error["code"] == "engine_unavailable" and "http://127.0.0.1:9 " in error["message"]


async def test_head_keeps_the_engine_s_content_length(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)

    async def head(request):
        return aiohttp.web.Response(body=b"x" * 123)

    sim._routes = lambda: {("HEAD", "/thing"): head}
    async with http.head(server.url + "/thing") as response:
        assert response.status == 200 and response.headers["Content-Length"] == "123"


async def test_work_sent_before_the_engine_is_up_is_held_and_then_served(make_sim, make_proxy, http):
    from autosleepd.sim import SimSettings, SimulatedEngine
    sim = SimulatedEngine(SimSettings(load_seconds=0.5))
    try:
        loading = asyncio.create_task(sim.start())
        server = await make_proxy(sim.url, wait_ready=False)
        assert server.supervisor.state is State.STARTING
        status, body = await post_completion(http, server.url, "early bird")
        assert status == 200 and body["choices"][0]["text"] == expected_text("early bird", 4)
        await loading
    finally:
        await sim.close()


async def test_an_engine_killed_and_restarted_is_found_again(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    assert (await post_completion(http, server.url))[0] == 200
    await sim.kill()
    request = asyncio.create_task(post_completion(http, server.url, "after restart"))
    await eventually(lambda: server.supervisor.state is State.UNAVAILABLE or request.done())
    await sim.start()
    status, body = await request
    assert status == 200 and body["choices"][0]["text"] == expected_text("after restart", 4)


async def test_an_engine_restarted_while_believed_asleep_is_served_correctly(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    await sleep_now(server)
    await sim.restart()   # a new process: awake, but autosleepd still believes it asleep
    status, body = await post_completion(http, server.url, "fresh engine")
    assert status == 200 and body["choices"][0]["text"] == expected_text("fresh engine", 4)
    assert sim.stats.violations == {}


async def test_a_sleep_done_behind_autosleepd_s_back_is_noticed(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, probe_interval=0.05)
    async with http.post(sim.url + "/sleep?level=1") as response:   # an operator, directly
        assert response.status == 200
    await server.supervisor.wait_for(State.ASLEEP, timeout=5)
    status, body = await post_completion(http, server.url, "desync")
    assert status == 200 and body["choices"][0]["text"] == expected_text("desync", 4)


async def test_without_dev_mode_it_keeps_proxying_and_says_why_it_cannot_sleep(make_sim, make_proxy, http):
    sim = await make_sim(dev_mode=False)
    server = await make_proxy(sim.url, idle_timeout=0.05)
    assert (await post_completion(http, server.url))[0] == 200
    async with http.get(server.url + "/autosleepd/status") as response:
        status = await response.json()
    assert status["state"] == "awake" and status["sleep_supported"] is False
    assert "Not Found" in status["last_error"]
    async with http.post(server.url + "/autosleepd/sleep") as response:
        assert response.status == 409
        assert "VLLM_SERVER_DEV_MODE" in (await response.json())["error"]["message"]


async def test_without_sleep_mode_a_failed_sleep_leaves_it_serving(make_sim, make_proxy, http):
    sim = await make_sim(sleep_mode=False)
    server = await make_proxy(sim.url, idle_timeout=0.05)
    await eventually(lambda: server.supervisor.stats.sleep_failures >= 1
                     and server.supervisor.state is State.AWAKE)
    assert (await post_completion(http, server.url))[0] == 200
    assert "Sleep mode is not enabled" in server.supervisor.status().to_json()["last_error"]


async def test_an_engine_killed_mid_stream_ends_the_client_s_stream_with_an_error(
        make_sim, make_proxy, http):
    sim = await make_sim(token_seconds=0.02)
    server = await make_proxy(sim.url)
    async with http.post(server.url + "/v1/completions",
                         json=completion("doomed", 1000, stream=True)) as response:
        await response.content.readline()
        await sim.kill()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), 5)   # an error, not a hang or a clean end
    await eventually(lambda: server.supervisor.admission.in_flight == 0)
    later = asyncio.create_task(post_completion(http, server.url, "after the crash"))
    await sim.start()
    status, body = await later
    assert status == 200 and body["choices"][0]["text"] == expected_text("after the crash", 4)


def test_every_refusal_reason_has_one_http_answer():
    from autosleepd.control.supervisor import Refused
    from autosleepd.proxy.errors import REFUSALS
    assert set(REFUSALS) == set(Refused.REASONS)


async def test_an_engine_slept_behind_our_back_is_found_by_the_stalled_request_and_woken(make_sim, make_proxy, http):
    sim = await make_sim(wake_seconds=0.2)
    server = await make_proxy(sim.url)   # believes the engine awake; the next probe is 30 s away
    async with http.post(sim.url + "/sleep?level=1&mode=wait") as response:   # an operator's curl
        assert response.status == 200
    status, body = await asyncio.wait_for(post_completion(http, server.url, "stuck"), 10)
    assert status == 200 and body["choices"][0]["text"] == expected_text("stuck", 4)
    await server.supervisor.wait_for(State.AWAKE, timeout=5)   # the answer can beat the last check
    assert server.supervisor.status().stats.wakes == 1 and sim.stats.calls["/wake_up"] == 1
    assert server.supervisor.admission.in_flight == 0


async def test_an_engine_already_asleep_never_gets_a_second_sleep(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, idle_timeout=0.2)
    assert (await post_completion(http, server.url))[0] == 200
    async with http.post(sim.url + "/sleep?level=1&mode=wait") as response:
        assert response.status == 200
    await server.supervisor.wait_for(State.ASLEEP, timeout=5)   # the idle timer read it first
    assert sim.stats.calls["/sleep"] == 1 and "sleep_while_asleep" not in sim.stats.violations
    assert (await post_completion(http, server.url))[0] == 200


async def test_a_failed_sleep_says_so_in_status_and_transitions(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    sim.fail_next("/sleep")
    async with http.post(server.url + "/autosleepd/sleep") as response:
        assert response.status == 409 and "sleep failed" in (await response.json())["error"]["message"]
    async with http.get(server.url + "/autosleepd/metrics") as response:
        text = await response.text()
    assert 'autosleepd_transitions_total{from_state="falling_asleep",to_state="awake"} 1.0' in text
    assert "autosleepd_sleep_failures_total 1.0" in text
    assert server.supervisor.status().to_json()["sleep_failures"] == 1
