"""Client connections: a cap on how many are open.

Past AUTOSLEEPD_MAX_CONNECTIONS a new connection gets a 503 and is closed at once, before it
costs more than its descriptor (client.py applies it, with the header and keep-alive deadlines).
"""

from __future__ import annotations

import json

import structlog

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
