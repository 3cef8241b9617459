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
        # The keep-alive or header deadline: a time and what it is, checked by a timer that is
        # never moved earlier (see _set_deadline), so a request costs no timer of its own.
        self._deadline: float | None = None
        self._deadline_is = ""
        self._timer: asyncio.TimerHandle | None = None
        self._head_size = 0
        self._last_request = False     # no request after this one (upgrade asked, or a bad one)
        self._counted = False
        self._ready = None             # an exchange to serve once this read is parsed

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
        self._set_deadline(relay.config.keepalive_timeout, "keepalive_timeout")

    def data_received(self, data: bytes) -> None:
        if not self._counted:
            return
        try:
            self._parser.feed_data(data)
            # Served after the whole read is parsed, so a body that came with its head goes
            # with it.
            self._serve_ready()
        except httptools.HttpParserUpgrade:
            # The request is whole; what follows would be another protocol, which the engine
            # is not asked for (Upgrade is hop-by-hop): answer it, then close.
            self._last_request = True
            self.pause("upgrade")
            self._serve_ready()
        except httptools.HttpParserError as error:
            self._bad_request(error)
            self._serve_ready()

    def _serve_ready(self) -> None:
        if self._ready is not None:
            exchange, self._ready = self._ready, None
            self.relay.serve(exchange)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self.relay.limits.closed()
            self.relay.connections.discard(self)
        if self._queue:
            self._queue.popleft().client_gone()
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

    # ----- the parser's callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = self.relay.exchange(self)
        self._head_size = 0
        self._set_deadline(self.relay.config.header_timeout, "header_timeout")

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
        # A body must keep coming (each read within the header timeout): a client that stops
        # halfway would hold its request in flight, and the engine awake, for ever.
        self._set_deadline(self.relay.config.header_timeout, "body_timeout")
        parser, exchange = self._parser, self._parsing
        exchange.headers_complete(parser.get_method(), parser.get_http_version(),
                                  parser.should_keep_alive())
        self._queue.append(exchange)
        if len(self._queue) == 1:
            self._ready = exchange
        else:
            self.pause("pipelined")

    def on_body(self, body: bytes) -> None:
        self._deadline = asyncio.get_running_loop().time() + self.relay.config.header_timeout
        self._parsing.body_chunk(body)

    def on_message_complete(self) -> None:
        exchange, self._parsing = self._parsing, None
        if self._deadline_is == "body_timeout":
            self._deadline = None
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
            # Not from inside this call: it may come from the engine connection's parser.
            self.resume("pipelined")
            asyncio.get_running_loop().call_soon(self.relay.serve, self._queue[0])
        elif self._parsing is None:
            self._set_deadline(self.relay.config.keepalive_timeout, "keepalive_timeout")

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

    # ----- the deadline -----------------------------------------------------------------------

    def _set_deadline(self, seconds: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        self._deadline, self._deadline_is = loop.time() + seconds, what
        if self._timer is None:
            self._timer = loop.call_later(self._shortest(), self._check_deadline)

    def _shortest(self) -> float:
        """The timer looks at least this often while a deadline is set: never later than the
        shortest deadline set from now could fall, so no deadline is ever missed, and none
        needs the timer moved earlier."""
        return min(self.relay.config.header_timeout, self.relay.config.keepalive_timeout)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        loop = asyncio.get_running_loop()
        left = self._deadline - loop.time()
        stalled_body = self._deadline_is == "body_timeout"
        if left > 0 or stalled_body and (self._paused or self._parsing is None
                                         or self._parsing.body_arrived is not None):
            # A body is not late while we do not read it (held, the engine or a pipelined
            # request first), nor while the relay reads it whole to route it (it answers 408).
            if left <= 0:
                left = self.relay.config.header_timeout
                self._deadline = loop.time() + left
            self._timer = loop.call_later(min(left, self._shortest()), self._check_deadline)
            return
        if self._deadline_is in ("header_timeout", "body_timeout"):
            _log.debug(self._deadline_is, client=self.remote,
                       seconds=self.relay.config.header_timeout)
        self.transport.close()
