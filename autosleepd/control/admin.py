"""autosleepd's own endpoints under /autosleepd/: status, health, manual sleep and wake.

Reading is open; manual control needs ``Authorization: Bearer $AUTOSLEEPD_ADMIN_TOKEN``, or,
when no token is set, a client on loopback.
"""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from ..proxy.errors import error_response
from .supervisor import OrderFailed, Supervisor


class Admin:
    def __init__(self, supervisor: Supervisor, token: str | None, default_level: int,
                 read_status=None):
        self.supervisor = supervisor
        self._read_status = read_status or (lambda: supervisor.status().to_json())
        self._token = token
        self._default_level = default_level

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/autosleepd/status", self.status),
            web.get("/autosleepd/healthz", self.healthz),
            web.get("/autosleepd/engine-healthz", self.engine_healthz),
            web.post("/autosleepd/sleep", self.sleep),
            web.post("/autosleepd/wake", self.wake),
            web.route("*", "/autosleepd/{rest:.*}", self.not_found),
        ]

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self._read_status())

    async def healthz(self, request: web.Request) -> web.Response:
        # autosleepd itself answers: that is all this says, whatever the engine's state.
        return web.json_response({"ok": True, "state": self.supervisor.state.value})

    async def engine_healthz(self, request: web.Request) -> web.Response:
        """For orchestrators: 503 once the engine is broken and needs a restart; never wakes it."""
        status = 503 if self.supervisor.broken else 200
        return web.json_response({"ok": status == 200, "state": self.supervisor.state.value,
                                  "broken_reason": self.supervisor.stats.broken_reason},
                                 status=status)

    async def sleep(self, request: web.Request) -> web.Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        raw = request.query.get("level", str(self._default_level))
        if raw not in ("1", "2"):
            return error_response(400, f"level={raw!r} is invalid: expected 1 or 2",
                                  "invalid_request_error", "bad_level")
        try:
            await self.supervisor.order_sleep(int(raw))
        except OrderFailed as failed:
            return error_response(409, f"sleep failed: {failed}", "conflict", "sleep_failed")
        return web.json_response(self._read_status())

    async def wake(self, request: web.Request) -> web.Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        try:
            await self.supervisor.order_wake()
        except OrderFailed as failed:
            return error_response(503, f"wake failed: {failed}", "service_unavailable",
                                  "wake_failed", retry_after=10)
        return web.json_response(self._read_status())

    async def not_found(self, request: web.Request) -> web.Response:
        return error_response(404, f"no such autosleepd endpoint: {request.method} {request.path}",
                              "not_found", "not_found")

    def _authorize(self, request: web.Request) -> web.Response | None:
        if self._token is None:
            if _is_loopback(request.remote):
                return None
            return error_response(403, "manual control is open to loopback clients only while "
                                  "AUTOSLEEPD_ADMIN_TOKEN is unset", "forbidden", "not_loopback")
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        # surrogateescape: header bytes that are not UTF-8 compare (unequal) instead of raising
        if scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode("utf-8", "surrogateescape"), self._token.encode()):
            return None
        response = error_response(401, "manual control needs Authorization: Bearer "
                                  "<AUTOSLEEPD_ADMIN_TOKEN>", "unauthorized", "bad_token")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False
