"""Hostile and messy traffic, on real sockets: held bodies, connection hygiene, classification
that a load balancer cannot abuse, secrets that never reach a client, headers a gateway expects."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal

import aiohttp
import pytest
from structlog.testing import capture_logs

from autosleepd.control.supervisor import State
from autosleepd.proxy.relay import UploadSlots
from autosleepd.sim import expected_text

from .conftest import completion, eventually, post_completion


async def sleep_now(server) -> None:
    await server.supervisor.order_sleep(server.config.sleep_level)


async def raw(port: int, data: bytes):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def read_response(reader) -> tuple[int, dict, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(lines[0].split()[1]), headers, body


async def test_expect_100_continue_is_answered_only_once_the_held_request_is_released(
        make_sim, make_proxy):
    sim = await make_sim(wake_seconds=0.3)
    server = await make_proxy(sim.url)
    await sleep_now(server)
    body = json.dumps(completion("continued")).encode()
    reader, writer = await raw(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(body))
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 100")
    assert server.supervisor.state is State.AWAKE, "100 Continue came before the wake"
    await reader.readline()
    writer.write(body)
    status, _, answer = await read_response(reader)
    assert status == 200 and json.loads(answer)["choices"][0]["text"] == expected_text("continued", 4)
    writer.close()


async def test_a_body_over_the_limit_is_refused_without_100_continue(make_sim, make_proxy):
    sim = await make_sim()
    server = await make_proxy(sim.url, max_body_size=1000)
    reader, writer = await raw(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                               b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status == 413
    writer.close()


async def test_held_large_bodies_are_all_delivered_whole_after_one_wake(make_sim, make_proxy, http):
    sim = await make_sim(wake_seconds=0.2)
    server = await make_proxy(sim.url)
    await sleep_now(server)
    prompts = [f"big {i} " + "y" * 300_000 for i in range(20)]
    results = await asyncio.gather(*(http.post(server.url + "/v1/completions",
                                               json=completion(p, 2)) for p in prompts))
    for prompt, response in zip(prompts, results):
        assert response.status == 200
        assert (await response.json())["choices"][0]["text"] == expected_text(prompt, 2)
    assert sim.stats.calls["/wake_up"] == 1 and sim.stats.violations == {}


async def test_a_stalled_held_upload_does_not_hold_up_the_bodies_released_after_it(
        make_sim, make_proxy, http):
    sim = await make_sim(wake_seconds=1.0)
    server = await make_proxy(sim.url)
    server.relay.uploads = UploadSlots(1, patience=0.2)
    await sleep_now(server)
    head = b'{"model": "sim-model", "max_tokens": 2, "prompt": "stalled '
    stalled_body = head + b"z" * 200_000 + b'"}'
    reader, writer = await raw(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(stalled_body)
                               + stalled_body[:100_000])
    await eventually(lambda: server.supervisor.status().queued == 1)
    # The stalled client holds the only slot first; the next body goes once it gives way.
    prompt = "next " + "y" * 200_000
    following = asyncio.create_task(http.post(server.url + "/v1/completions",
                                              json=completion(prompt, 2)))
    await eventually(lambda: server.supervisor.status().queued == 2)
    response = await asyncio.wait_for(following, 10)
    assert response.status == 200
    assert (await response.json())["choices"][0]["text"] == expected_text(prompt, 2)
    writer.write(stalled_body[100_000:])
    status, _, answer = await read_response(reader)
    assert status == 200
    assert json.loads(answer)["choices"][0]["text"] == expected_text("stalled " + "z" * 200_000, 2)
    assert sim.stats.calls["/wake_up"] == 1 and sim.stats.violations == {}
    writer.close()


@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/favicon.ico"), ("HEAD", "/"),
                                          ("OPTIONS", "/v1/completions"), ("GET", "/.env"),
                                          ("GET", "/v1/completions")])
async def test_get_head_and_options_never_wake_the_engine(make_sim, make_proxy, http, method, path):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    await sleep_now(server)
    async with http.request(method, server.url + path) as response:
        assert response.status in (404, 405)   # vLLM's (the simulator's) answer, engine asleep
    assert server.supervisor.state is State.ASLEEP and sim.stats.calls["/wake_up"] == 0
    assert sim.stats.violations == {}


async def test_a_load_balancer_probing_slash_does_not_keep_the_engine_awake(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, idle_timeout=0.2)
    assert (await post_completion(http, server.url))[0] == 200
    async with asyncio.timeout(5):
        while server.supervisor.state is not State.ASLEEP:
            async with http.get(server.url + "/") as response:
                assert response.status == 404
    assert sim.stats.calls["/wake_up"] == 0


async def test_a_get_with_a_body_is_work(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    await sleep_now(server)
    async with http.get(server.url + "/v1/completions", json=completion()) as response:
        assert response.status == 404   # the simulator routes completions on POST only
    assert sim.stats.calls["/wake_up"] == 1 and sim.stats.violations == {}


async def test_an_absolute_form_target_is_forwarded_as_path_and_query(make_sim, make_proxy):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    body = json.dumps(completion("absolute")).encode()
    reader, writer = await raw(server.port, b"POST http://elsewhere.invalid/v1/completions HTTP/1.1\r\n"
                               b"Host: elsewhere.invalid\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    status, _, answer = await read_response(reader)
    assert status == 200 and json.loads(answer)["choices"][0]["text"] == expected_text("absolute", 4)
    writer.write(b"POST http://elsewhere.invalid/sleep HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert (await read_response(reader))[0] == 403
    writer.close()


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarding_headers_append_the_client_and_trust_only_the_configured_front(
        make_sim, make_proxy, http, trusted):
    import ipaddress
    sim = await make_sim()
    fronts = frozenset({ipaddress.ip_network("127.0.0.0/8")}) if trusted else frozenset()
    server = await make_proxy(sim.url, trusted_proxies=fronts)
    seen = {}

    async def capture(request):
        seen.update(request.headers)
        return aiohttp.web.Response(text="ok")

    sim._routes = lambda: {("GET", "/where"): capture}
    async with http.get(server.url + "/where", headers={
            "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "api.example.com"}) as response:
        assert response.status == 200
    assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    if trusted:
        assert (seen["X-Forwarded-Proto"], seen["X-Forwarded-Host"]) == ("https", "api.example.com")
    else:
        assert seen["X-Forwarded-Proto"] == "http"
        assert seen["X-Forwarded-Host"] == f"127.0.0.1:{server.port}"


@pytest.mark.single_process   # it captures this process's logs
async def test_a_malformed_engine_answer_gives_502_without_the_client_s_headers(make_proxy, http):
    async def broken(reader, writer):   # answers its state, and garbage to anything else
        if b"/is_sleeping" in await reader.readuntil(b"\r\n\r\n"):
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\n{"is_sleeping": false}')
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
        await writer.drain()
        writer.close()

    engine = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = engine.sockets[0].getsockname()[1]
    try:
        server = await make_proxy(f"http://127.0.0.1:{port}", wait_ready=False)
        with capture_logs() as logs:
            async with http.get(server.url + "/health",
                                headers={"Authorization": "Bearer sk-very-secret"}) as response:
                assert response.status == 502 and response.headers["Retry-After"] == "5"
                text = await response.text()
        assert json.loads(text)["error"]["code"] == "upstream_failed"
        assert "sk-very-secret" not in text and "Authorization" not in text
        assert "sk-very-secret" not in repr(logs) and any(e["event"] == "upstream_failed" for e in logs)
    finally:
        engine.close()


@pytest.mark.single_process   # the cap is per process, and it captures this process's logs
async def test_past_the_connection_cap_new_clients_get_503_and_it_is_logged_once(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, max_connections=3)
    idle = [await raw(server.port, b"") for _ in range(3)]
    await eventually(lambda: server.port and len(server.relay.connections) == 3)
    with capture_logs() as logs:
        for _ in range(2):
            reader, writer = await raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = await read_response(reader)
            assert status == 503 and headers["retry-after"] == "1"
            assert json.loads(body)["error"]["code"] == "too_many_connections"
            writer.close()
    assert [e["event"] for e in logs].count("connection_limit_reached") == 1
    for _, writer in idle:
        writer.close()
    await eventually(lambda: len(server.relay.connections) == 0)
    assert (await post_completion(http, server.url))[0] == 200


async def test_slow_headers_and_idle_keep_alive_connections_are_closed(make_sim, make_proxy):
    sim = await make_sim()
    server = await make_proxy(sim.url, header_timeout=0.2, keepalive_timeout=0.3)
    slow_reader, slow = await raw(server.port, b"GET /health HTTP/1.1\r\nHo")
    idle_reader, idle = await raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(idle_reader))[0] == 200
    assert await asyncio.wait_for(slow_reader.read(), 5) == b""   # closed by autosleepd
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    slow.close()
    idle.close()



async def test_a_client_that_stops_halfway_through_its_body_does_not_keep_the_engine_awake(make_sim, make_proxy):
    sim = await make_sim(sleep_seconds=0.01)
    server = await make_proxy(sim.url, header_timeout=0.2, idle_timeout=0.3)
    reader, writer = await raw(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                            b"Content-Type: application/json\r\n"
                                            b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    await eventually(lambda: server.supervisor.admission.in_flight == 1, what="the request in flight")
    assert await asyncio.wait_for(reader.read(), 5) == b""        # closed by autosleepd
    await eventually(lambda: server.supervisor.state is State.ASLEEP, what="the idle sleep")
    writer.close()


@pytest.mark.single_process   # it exhausts the descriptors of the process it reads
async def test_out_of_descriptors_gives_503_and_leaves_the_engine_state_alone(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    reader, writer = await raw(server.port, b"")
    await eventually(lambda: len(server.relay.connections) == 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    try:
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        status, _, body = await read_response(reader)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert status == 503 and json.loads(body)["error"]["code"] == "proxy_overloaded"
    assert server.supervisor.state is State.AWAKE
    writer.close()
    assert (await post_completion(http, server.url))[0] == 200


async def test_non_utf8_authorization_on_an_admin_path_gets_401(make_sim, make_proxy):
    sim = await make_sim()
    server = await make_proxy(sim.url, admin_token="9f86d081884c7d659a2feaa0c55ad015")
    reader, writer = await raw(server.port, b"POST /autosleepd/sleep HTTP/1.1\r\nHost: x\r\n"
                               b"Authorization: Bearer \xff\xfe\x80\r\nContent-Length: 0\r\n\r\n")
    assert (await read_response(reader))[0] == 401
    assert server.supervisor.state is State.AWAKE
    writer.close()


async def test_a_malformed_request_logs_one_debug_line_and_no_traceback(make_sim, start_daemon):
    sim = await make_sim()
    daemon = await start_daemon(sim.url, AUTOSLEEPD_LOG_LEVEL="debug")
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
                    b"POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n"):
        reader, writer = await raw(daemon.port, garbage)
        assert (await asyncio.wait_for(reader.readline(), 10)).split()[1].startswith(b"4")
        writer.close()
    daemon.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(daemon.read_log_until_exit(), 30) == 0
    assert not [line for line in daemon.lines if line["level"] == "error"]
    assert not [line for line in daemon.lines if "exception" in line]
    assert [line["event"] for line in daemon.lines].count("bad_request") == 3


async def test_a_misspelled_variable_is_warned_about_with_the_closest_name(make_sim, start_daemon):
    sim = await make_sim()
    daemon = await start_daemon(sim.url, AUTOSLEEPD_IDLE_TIMOUT="10s")
    warning = next(line for line in daemon.lines if line["event"] == "unknown_variable")
    assert warning["name"] == "AUTOSLEEPD_IDLE_TIMOUT"
    assert warning["did_you_mean"] == "AUTOSLEEPD_IDLE_TIMEOUT"


async def test_with_its_log_reader_gone_it_still_serves_and_exits_0_on_sigterm(make_sim, start_daemon, http):
    sim = await make_sim()
    daemon = await start_daemon(sim.url, AUTOSLEEPD_LOG_REQUESTS="true")
    daemon.process._transport.get_pipe_transport(2).close()   # the reader of stderr goes away
    for i in range(20):   # each logs a line into the closed pipe
        assert (await post_completion(http, daemon.url, f"unread {i}"))[0] == 200
    daemon.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(daemon.process.wait(), 15) == 0
