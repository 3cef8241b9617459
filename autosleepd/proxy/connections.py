"""Client connections: a cap on how many are open, a deadline for request headers, and quiet
handling of malformed requests.

aiohttp's own keep-alive timer closes a connection idle between requests (or from its opening);
this adds what it lacks: a connection that has started a request must finish its headers within
AUTOSLEEPD_HEADER_TIMEOUT (slowloris), and past AUTOSLEEPD_MAX_CONNECTIONS a new connection gets
a 503 and is closed at once, before it costs more than its descriptor.
"""

from __future__ import annotations

import json

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

_log = structlog.get_logger("autosleepd.proxy")

_FULL_BODY = json.dumps({"error": {
    "message": "autosleepd has too many open connections (AUTOSLEEPD_MAX_CONNECTIONS); retry",
    "type": "service_unavailable", "param": None, "code": "too_many_connections"}}).encode()
FULL_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(_FULL_BODY), _FULL_BODY))


class Limits:
    """What every connection shares: the cap, the header deadline, and the count of open ones."""

    def __init__(self, max_connections: int, header_timeout: float):
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.open = 0
        self.full = False   # the cap was reached and not yet left: it is logged once per episode

    def admit(self) -> bool:
        if self.open >= self.max_connections:
            if not self.full:
                self.full = True
                _log.warning("connection_limit_reached", max_connections=self.max_connections,
                             hint="new connections get 503 until some close; raise "
                                  "AUTOSLEEPD_MAX_CONNECTIONS if this is normal traffic")
            return False
        self.open += 1
        return True

    def closed(self) -> None:
        self.open -= 1
        if self.full and self.open < self.max_connections * 0.9:
            self.full = False
            _log.info("connection_limit_cleared", open=self.open)


class Connection(web.RequestHandler):
    """One client connection, counted against the cap and held to the header deadline."""

    def __init__(self, manager: web.Server, limits: Limits, **kwargs):
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._counted = False
        self._header_deadline = None   # a timer while a request's headers are arriving

    def connection_made(self, transport) -> None:
        if not self._limits.admit():
            transport.write(FULL_RESPONSE)
            transport.close()
            self._manager = None   # never served: connection_lost has nothing to undo
            return
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._limits.closed()
        self._stop_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress:   # headers complete
            self._stop_header_deadline()
        elif self._header_deadline is None and self.transport is not None:
            self._header_deadline = self._loop.call_later(self._limits.header_timeout,
                                                          self._headers_too_slow)

    def _stop_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        _log.debug("header_timeout", client=self._remote(),
                   seconds=self._limits.header_timeout)
        self.force_close()

    def log_exception(self, message: str, *args, exc_info=None, **kwargs) -> None:
        """A malformed request is the client's fault: one line at debug, no traceback, and
        only the class of the error (its text can quote the client's headers)."""
        if isinstance(exc_info, HttpProcessingError):
            _log.debug("bad_request", client=self._remote(), error=type(exc_info).__name__)
            return
        super().log_exception(message, *args, exc_info=exc_info, **kwargs)

    def _remote(self) -> str | None:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return peer[0] if peer else None
