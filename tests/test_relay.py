"""The relay's own HTTP/1 handling, on real sockets: engine connections kept alive and aged out,
pipelined requests, HTTP/1.0 clients, and back-pressure from a slow client to the engine."""

from __future__ import annotations

import asyncio
import json

import pytest

from autosleepd.sim import expected_text

from .conftest import completion, eventually


async def raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(), 10)   # until autosleepd closes
    writer.close()
    return answer


class Engine:
    """A tiny engine on a raw socket: notes what each connection asked, answers ``GET /big`` with
    ``size`` bytes of chunks (noting how many it could write), anything else with its path."""

    def __init__(self, size: int = 0):
        self.connections: list[list[bytes]] = []   # the paths asked on each
        self.size = size
        self.written = 0
        self.finished = asyncio.Event()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader, writer) -> None:
        paths: list[bytes] = []
        self.connections.append(paths)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ", 2)[1]
                paths.append(path)
                if path == b"/big":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    chunk = b"x" * 65536
                    while self.written < self.size:
                        writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                        await writer.drain()
                        self.written += len(chunk)
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    self.finished.set()
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(path), path))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_streamed_answer_reaches_an_http_1_0_client_without_chunks(make_sim, make_proxy):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    body = json.dumps(completion("old client", 5, stream=True)).encode()
    answer = await raw_request(server.port, b"POST /v1/completions HTTP/1.0\r\nContent-Type: "
                               b"application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
    events = [json.loads(line[6:]) for line in payload.split(b"\n\n") if line.startswith(b"data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == expected_text("old client", 5)
    assert payload.rstrip().endswith(b"data: [DONE]")


async def test_pipelined_requests_are_answered_in_order(make_sim, make_proxy):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    requests = b""
    for prompt in ("first", "second", "third"):
        body = json.dumps(completion(prompt, 3)).encode()
        requests += (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    requests += b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await raw_request(server.port, requests)
    texts = [json.loads(part[:part.rindex(b"}") + 1])["choices"][0]["text"]
             for part in answer.split(b"\r\n\r\n")[1:] if part.startswith(b"{")]
    assert texts == [expected_text(p, 3) for p in ("first", "second", "third")]
    assert answer.count(b"HTTP/1.1 200") == 4


@pytest.mark.single_process   # it ages this process's engine connections
async def test_engine_connections_are_kept_alive_and_dropped_once_too_old(make_proxy, http):
    engine = Engine()
    server = await make_proxy(await engine.start(), wait_ready=False)
    for _ in range(5):
        async with http.get(server.url + "/health") as response:
            assert await response.text() == "/health"
    carrying = [paths for paths in engine.connections if b"/health" in paths]
    assert carrying == [[b"/health"] * 5]   # one kept-alive connection carried all five
    server.relay.engine.upstream.keepalive = 0.0   # as if the 4 s had passed, idle
    async with http.get(server.url + "/health") as response:
        assert response.status == 200
    carrying = [paths for paths in engine.connections if b"/health" in paths]
    assert carrying == [[b"/health"] * 5, [b"/health"]]   # the old one was not trusted any more
    engine.server.close()


async def stops_growing(read, steady: int = 10, step: float = 0.05, timeout: float = 20) -> int:
    """``read()`` once it gave the same value ``steady`` polls in a row (within ``timeout``)."""
    async with asyncio.timeout(timeout):
        last, same = read(), 0
        while same < steady:
            await asyncio.sleep(step)
            now = read()
            same, last = (same + 1 if now == last else 0), now
    return last


async def test_a_client_that_does_not_read_stops_the_engine_s_answer_not_autosleepd_s_memory(
        make_proxy):
    engine = Engine(size=256 * 2**20)
    server = await make_proxy(await engine.start(), wait_ready=False)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: engine.written > 0)
    stalled_at = await stops_growing(lambda: engine.written)   # the client reads nothing
    assert stalled_at < 64 * 2**20, "the engine's answer went on while nobody read it"
    received = 0
    while not engine.finished.is_set() or received < engine.size:
        data = await asyncio.wait_for(reader.read(2**20), 10)
        assert data
        received += data.count(b"x")
    assert received == engine.size
    writer.close()
    engine.server.close()


async def test_an_expectation_other_than_100_continue_gets_417_and_never_reaches_the_engine(
        make_sim, make_proxy):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    answer = await raw_request(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                               b"Expect: something-else\r\nContent-Length: 2\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 417 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "expectation_failed"
    assert sim.stats.calls["/v1/completions"] == 0
