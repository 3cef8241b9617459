"""One client connection, parsed with llhttp: requests in, answers out, in order.

Requests are served one at a time; a pipelined request waits (its bytes unread beyond what
arrived with the one before). Reading pauses for as long as any reason holds: a held request,
an engine not taking the body fast enough, a pipelined request waiting. The connection counts
against AUTOSLEEPD_MAX_CONNECTIONS, must finish a request's headers within
AUTOSLEEPD_HEADER_TIMEOUT (slowloris) and is closed after AUTOSLEEPD_KEEPALIVE_TIMEOUT idle.
"""

from __future__ import annotations

import asyncio
import collections

import httptools
import structlog

from .connections import FULL_RESPONSE

_log = structlog.get_logger("autosleepd.proxy")

MAX_HEADER_LINE = 8190       # as aiohttp and nginx: a longer request line or header is refused
MAX_HEAD = 64 * 1024         # all of a request's headers together
WRITE_BUFFER = 256 * 1024    # past this much unsent to the client, the engine is not read


class HeadTooLarge(Exception):
    pass


class ClientConnection(asyncio.Protocol):
    def __init__(self, relay):
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        self.trusted = False           # a front named in AUTOSLEEPD_TRUSTED_PROXIES
        self._parser = httptools.HttpRequestParser(self)
        self._parsing = None           # the exchange whose request is arriving
        self._queue: collections.deque = collections.deque()   # head: the one being served
        self._paused: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None   # keep-alive or header deadline
        self._head_size = 0
        self._last_request = False     # no request after this one (upgrade asked, or a bad one)
        self._counted = False

    # ----- the socket -----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        relay = self.relay
        if not relay.limits.admit():
            transport.write(FULL_RESPONSE)
            transport.close()
            return
        self._counted = True
        relay.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else ""
        self.trusted = relay.is_trusted(self.remote)
        transport.set_write_buffer_limits(high=WRITE_BUFFER)
        self._start_timer(relay.config.keepalive_timeout, "keepalive_timeout")

    def data_received(self, data: bytes) -> None:
        if not self._counted:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request is whole; what follows would be another protocol, which the engine
            # is not asked for (Upgrade is hop-by-hop): answer it, then close.
            self._last_request = True
            self.pause("upgrade")
        except httptools.HttpParserError as error:
            self._bad_request(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._counted:
            self._counted = False
            self.relay.limits.closed()
            self.relay.connections.discard(self)
        for exchange in self._queue:
            exchange.client_gone()
        self._queue.clear()

    def pause_writing(self) -> None:
        if self._queue:
            self._queue[0].client_paused(True)

    def resume_writing(self) -> None:
        if self._queue:
            self._queue[0].client_paused(False)

    def pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    @property
    def idle(self) -> bool:
        return not self._queue and self._parsing is None

    def serving(self) -> asyncio.Task | None:
        """The task of the request being answered, if any."""
        return self._queue[0].task if self._queue else None

    # ----- the parser's callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = self.relay.exchange(self)
        self._head_size = 0
        self._start_timer(self.relay.config.header_timeout, "header_timeout")

    def on_url(self, url: bytes) -> None:
        self._parsing.url += url
        if len(self._parsing.url) > MAX_HEADER_LINE:
            raise HeadTooLarge("the request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if len(name) + len(value) > MAX_HEADER_LINE or self._head_size > MAX_HEAD:
            raise HeadTooLarge("a header or the headers together are too large")
        self._parsing.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._stop_timer()
        parser, exchange = self._parser, self._parsing
        exchange.headers_complete(parser.get_method(), parser.get_http_version(),
                                  parser.should_keep_alive())
        self._queue.append(exchange)
        if len(self._queue) == 1:
            self.relay.serve(exchange)
        else:
            self.pause("pipelined")

    def on_body(self, body: bytes) -> None:
        self._parsing.body_chunk(body)

    def on_message_complete(self) -> None:
        exchange, self._parsing = self._parsing, None
        exchange.body_complete()

    # ----- the exchanges ------------------------------------------------------------------------

    def finished(self, exchange, reusable: bool) -> None:
        """``exchange`` has written its whole answer; the next request may be served."""
        if self._queue and self._queue[0] is exchange:
            self._queue.popleft()
        self.resume("held")
        self.resume("upstream")
        if self.transport.is_closing():
            return
        if not reusable or self._last_request or not exchange.body_done:
            self.transport.close()
            return
        if self._queue:
            self.resume("pipelined")
            self.relay.serve(self._queue[0])
        elif self._parsing is None:
            self._start_timer(self.relay.config.keepalive_timeout, "keepalive_timeout")

    def _bad_request(self, error: Exception) -> None:
        """A malformed request is the client's fault: one line at debug, only the class of the
        error (its text can quote the client's headers), a 4xx and the connection closed."""
        cause = error.__context__ if isinstance(error, httptools.HttpParserCallbackError) else error
        _log.debug("bad_request", client=self.remote, error=type(cause).__name__)
        self._last_request = True
        self._parsing = None
        if not self._queue:   # else the answer in progress ends, then the connection closes
            status = (b"431 Request Header Fields Too Large" if isinstance(cause, HeadTooLarge)
                      else b"400 Bad Request")
            self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
            self.transport.close()

    # ----- timers ---------------------------------------------------------------------------------

    def _start_timer(self, seconds: float, why: str) -> None:
        self._stop_timer()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._timed_out, why)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, why: str) -> None:
        self._timer = None
        if why == "header_timeout":
            _log.debug("header_timeout", client=self.remote,
                       seconds=self.relay.config.header_timeout)
        self.transport.close()
