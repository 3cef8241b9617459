"""The engine's name is looked up once at a time per engine: a lookup that hangs (Docker's DNS
for a stopped engine container, where no DNS server answers) must not take a resolver thread per
waiting request, or every other engine's connects wait behind them (found by integration: on
the two-model compose stack with workers, streams to the engine that was up were not connected
after seconds while requests for the stopped one were held)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from autosleepd.proxy.upstream import Upstream


@pytest.fixture
def dns(monkeypatch):
    """The host's resolver: ``down.test`` hangs (until the test ends), ``up.test`` is loopback."""
    hang = threading.Event()
    real = socket.getaddrinfo
    lookups = {"down.test": 0}

    def getaddrinfo(host, *args, **kwargs):
        if host == "down.test":
            lookups["down.test"] += 1
            hang.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real("127.0.0.1" if host == "up.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield lookups, hang
    hang.set()


async def test_a_hung_lookup_for_one_engine_leaves_the_other_engines_connects_alone(dns):
    lookups, hang = dns
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    down = Upstream(f"http://down.test:{port}", connect_timeout=0.2)
    up = Upstream(f"http://up.test:{port}")
    try:
        # More requests for the stopped engine than any default resolver pool has threads (32).
        tries = await asyncio.gather(*(down.connection() for _ in range(40)), return_exceptions=True)
        assert all(isinstance(outcome, TimeoutError) for outcome in tries), tries[:3]
        async with asyncio.timeout(5):   # every lookup of down.test still hangs
            connection = await up.connection()
        connection.close()
        assert lookups["down.test"] == 1, "one lookup shared by every waiting connect"
    finally:
        hang.set()   # before the loop closes: it waits for its resolver threads
        server.close()
        await server.wait_closed()


async def test_a_failed_lookup_reaches_every_waiting_connect_and_the_next_connect_looks_again(monkeypatch):
    lookups = []

    def getaddrinfo(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    gone = Upstream("http://gone.test:8000")
    for _ in range(2):
        outcomes = await asyncio.gather(*(gone.connection() for _ in range(3)), return_exceptions=True)
        assert all(isinstance(outcome, socket.gaierror) for outcome in outcomes), outcomes
    assert len(lookups) == 2   # shared while in progress (one a round), never cached after
