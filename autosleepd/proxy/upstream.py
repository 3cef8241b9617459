"""Connections to one upstream (the engine, or autosleepd's own app): a small keep-alive pool,
each connection parsing its answers with llhttp and handing their bytes on as they arrive.

A connection carries one exchange at a time. The answer's head is parsed and given to the
exchange; the body's bytes pass on untouched, framing included (``response_bytes``), and the
parser only follows them to find the answer's end.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from typing import Protocol
from urllib.parse import urlsplit

import httptools

UPSTREAM_KEEPALIVE = 4.0   # seconds; vLLM's uvicorn closes idle connections after 5
MAX_RESPONSE_HEAD = 64 * 1024
WRITE_BUFFER = 256 * 1024   # past this much unsent to the engine, the client is not read


class Exchange(Protocol):
    """What a connection tells the request it carries."""

    def response_head(self, status: int, head: bytes, lower: bytes, framing: str) -> bool: ...
    def response_bytes(self, data: bytes) -> None: ...
    def response_flush(self) -> None: ...
    def response_end(self, reusable: bool) -> None: ...
    def upstream_lost(self, error: Exception | None) -> None: ...
    def upstream_paused(self, paused: bool) -> None: ...


class Upstream:
    """An address (``http(s)://host:port[/prefix]`` or a unix socket) and its idle connections."""

    def __init__(self, url: str | None = None, unix_path: str | None = None,
                 connect_timeout: float = 5.0, keepalive: float = UPSTREAM_KEEPALIVE):
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.unix_path = unix_path
        self.name = url or unix_path   # where it is, for messages
        self.ssl = None
        if url is not None:
            parts = urlsplit(url)
            self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
            if parts.scheme == "https":
                self.ssl = ssl.create_default_context()
            self.host_header = parts.netloc.encode()
            self.prefix = parts.path.rstrip("/").encode()
        else:
            self.host_header, self.prefix = b"localhost", b""
        self._idle: list[UpstreamConnection] = []
        self._lookup: asyncio.Future | None = None   # the lookup of host in progress, shared

    def idle(self) -> "UpstreamConnection | None":
        """An idle connection young enough to trust: older ones are closed here, lazily (the
        engine closes them too, after its own keep-alive)."""
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection = self._idle.pop()   # the most recent: older ones age out
            if now - connection.idle_since < self.keepalive:
                return connection
            connection.close()
        return None

    async def connection(self) -> "UpstreamConnection":
        """An idle connection, else a new one (``OSError``, ``TimeoutError``)."""
        connection = self.idle()
        if connection is not None:
            return connection
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            if self.unix_path is not None:
                _, connection = await loop.create_unix_connection(lambda: UpstreamConnection(self),
                                                                  self.unix_path)
                return connection
            failures = []
            for address in await self._addresses():   # in the resolver's order, as asyncio does
                try:
                    _, connection = await loop.create_connection(
                        lambda: UpstreamConnection(self), address[0], address[1], ssl=self.ssl,
                        server_hostname=self.host if self.ssl else None)
                    return connection
                except OSError as error:
                    failures.append(error)
            raise failures[0]

    async def _addresses(self) -> list:
        """The host's addresses, looked up once at a time: connects that need them meanwhile
        share the lookup. A lookup can hang (Docker's DNS for a stopped engine container, where
        no DNS server answers, fails it after 10 s) and holds a resolver thread all along, which
        no timeout gives back: one per waiting request took every thread, and the connects of
        every other engine waited behind them (found by integration)."""
        if _numeric(self.host):
            return [(self.host, self.port)]
        lookup = self._lookup
        if lookup is None:
            lookup = self._lookup = asyncio.ensure_future(asyncio.get_running_loop().getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM))
            lookup.add_done_callback(self._looked_up)
        infos = await asyncio.shield(lookup)   # a connect timing out leaves it to the others
        return [info[4] for info in infos]

    def _looked_up(self, lookup: asyncio.Future) -> None:
        self._lookup = None   # the next connect looks again: engines move (a container restarted)
        if not lookup.cancelled():
            lookup.exception()   # seen here: a failure is each waiting connect's to report

    def put_back(self, connection: "UpstreamConnection") -> None:
        connection.pause_reading(False)   # a slow client may have paused it
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.append(connection)

    def forget(self, connection: "UpstreamConnection") -> None:
        if connection in self._idle:
            self._idle.remove(connection)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


def _numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self._parser = self._raw_parser = None
        self._head = b""          # the answer's head while it is incomplete
        self._in_body = False
        self._raw = True          # body bytes pass on framed as they came
        self._answer_head = b""  # the answer's head as the engine sent it
        self.sink = None          # the client's transport, once the answer's head went to it
        self._head_only = False   # the answer to HEAD: it ends with its head
        self._paused = False      # not read: the client takes the answer slower than it comes

    # ----- the exchange's side -----------------------------------------------------------------

    def send(self, exchange: Exchange, data: bytes, head_only: bool, decode: bool) -> None:
        """``decode``: the client may need the body without its chunks (HTTP/1.0); only then
        does the parser hand the body over, which costs a call per read."""
        self.exchange = exchange
        self._head, self._in_body, self._raw, self.sink = b"", False, True, None
        self._head_only = head_only
        self._parser = httptools.HttpResponseParser(_Decoding(self)) if decode else self._raw_parser
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_reading(self, paused: bool) -> None:
        if paused != self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close(self) -> None:
        self.exchange = self.sink = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """The exchange is over before its answer ended: the engine must see the request go."""
        self.exchange = self.sink = None
        if self.transport is not None:
            self.transport.abort()

    # ----- the socket's side -------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._raw_parser = httptools.HttpResponseParser(self)   # one for the answers in turn
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:   # bytes while idle: nothing asked for them
            self.close()
            return
        try:
            if self._in_body:   # the common case: a read of the body, passed on as it is
                if self._raw:
                    sink = self.sink
                    if sink is None:
                        exchange.response_bytes(data)
                    elif not sink.is_closing():
                        sink.write(data)
                self._parser.feed_data(data)
                return
            data = self._head + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_RESPONSE_HEAD:
                    raise httptools.HttpParserError("the answer's head is too large")
                self._head = data
                return
            self._head, self._in_body = b"", True
            self._answer_head = data[:end + 4]
            self._parser.feed_data(self._answer_head)
            data = data[end + 4:]
            if data and self.exchange is exchange:
                if self._raw:
                    exchange.response_bytes(data)
                self._parser.feed_data(data)
            if self.exchange is exchange:
                exchange.response_flush()
        except httptools.HttpParserError as error:
            self.exchange = self.sink = None
            self.transport.abort()
            exchange.upstream_lost(error)

    def on_headers_complete(self) -> None:
        # llhttp has checked the head; its headers are read from the bytes, which costs no
        # call per header.
        status = self._parser.get_status_code()
        head = self._answer_head
        lower = head.lower()
        if self._head_only or status in (204, 304):
            framing = "none"
        elif b"\r\ntransfer-encoding:" in lower:
            framing = "chunked"
        elif b"\r\ncontent-length:" in lower:
            framing = "length"
        else:
            framing = "close"   # the body ends when the engine closes the connection
        self._raw = self.exchange.response_head(status, head, lower, framing)
        if self._head_only:
            self.on_message_complete()

    def decoded_body(self, body: bytes) -> None:
        if not self._raw and self.exchange is not None:
            self.exchange.response_bytes(body)

    def on_message_complete(self) -> None:
        exchange, self.exchange, self.sink = self.exchange, None, None
        if exchange is None:
            return
        reusable = self._parser.should_keep_alive() and not self._head_only
        exchange.response_end(reusable)

    def connection_lost(self, exc: Exception | None) -> None:
        self.upstream.forget(self)
        exchange, self.exchange, self.sink = self.exchange, None, None
        if exchange is not None:
            exchange.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_paused(False)


class _Decoding:
    """A connection's callbacks with the body's too: for a parser that hands the body over."""

    def __init__(self, connection: UpstreamConnection):
        self.on_headers_complete = connection.on_headers_complete
        self.on_body = connection.decoded_body
        self.on_message_complete = connection.on_message_complete
