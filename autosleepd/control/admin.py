"""autosleepd's own endpoints under /autosleepd/: status, health, the host view, manual sleep
and wake, pins.

Reading is open; manual control needs ``Authorization: Bearer $AUTOSLEEPD_ADMIN_TOKEN``, or,
when no token is set, a client on loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import json

from aiohttp import web

from ..config import parse_duration
from ..proxy.errors import error_response
from .supervisor import OrderFailed

if TYPE_CHECKING:
    from ..host import Host, HostedEngine

MAX_PIN = 366 * 86400.0   # seconds; longer is what a pin until unpinned is for


class Admin:
    def __init__(self, host: "Host", token: str | None, default_level: int, read_status=None):
        self.host = host
        self._read_status = read_status or (lambda engine: engine.supervisor.status().to_json())
        self._token = token
        self._default_level = default_level

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/autosleepd/status", self.status),
            web.get("/autosleepd/healthz", self.healthz),
            web.get("/autosleepd/engine-healthz", self.engine_healthz),
            web.get("/autosleepd/host", self.host_view),
            web.post("/autosleepd/sleep", self.sleep),
            web.post("/autosleepd/wake", self.wake),
            web.post("/autosleepd/pin", self.pin),
            web.post("/autosleepd/unpin", self.unpin),
            web.route("*", "/autosleepd/{rest:.*}", self.not_found),
        ]

    async def status(self, request: web.Request) -> web.Response:
        engine = self._engine(request.query.get("engine") or request.query.get("model"))
        if isinstance(engine, web.Response):
            return engine
        return web.json_response(self._read_status(engine))

    async def healthz(self, request: web.Request) -> web.Response:
        # autosleepd itself answers: that is all this says, whatever the engines' states.
        states = {e.name: e.supervisor.state.value for e in self.host.engines}
        if self.host.single:
            return web.json_response({"ok": True, "state": next(iter(states.values()))})
        return web.json_response({"ok": True, "engines": states})

    async def engine_healthz(self, request: web.Request) -> web.Response:
        """For orchestrators: 503 once the engine is broken and needs a restart; never wakes it.
        On a host of several, ``?engine=NAME`` asks about one (else: 503 if any is broken)."""
        named = request.query.get("engine") or request.query.get("model")
        if named is not None or self.host.single:
            engine = self._engine(named)
            if isinstance(engine, web.Response):
                return engine
            supervisor = engine.supervisor
            status = 503 if supervisor.broken else 200
            return web.json_response({"ok": status == 200, "state": supervisor.state.value,
                                      "broken_reason": supervisor.stats.broken_reason},
                                     status=status)
        broken = {e.name: e.supervisor.stats.broken_reason for e in self.host.engines
                  if e.supervisor.broken}
        return web.json_response({"ok": not broken, "broken": broken}, status=503 if broken else 200)

    async def host_view(self, request: web.Request) -> web.Response:
        """Every engine: its models, state, memory, last use, held work, next transition, pin."""
        return web.json_response(self.host.view(history=request.query.get("history") == "1"))

    async def sleep(self, request: web.Request) -> web.Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        engine = self._engine(request.query.get("engine") or request.query.get("model"))
        if isinstance(engine, web.Response):
            return engine
        raw = request.query.get("level", str(self._default_level))
        if raw not in ("1", "2"):
            return error_response(400, f"level={raw!r} is invalid: expected 1 or 2",
                                  "invalid_request_error", "bad_level")
        try:
            await engine.supervisor.order_sleep(int(raw))
        except OrderFailed as failed:
            return error_response(409, f"sleep failed: {failed}", "conflict", "sleep_failed")
        return web.json_response(self._read_status(engine))

    async def wake(self, request: web.Request) -> web.Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        engine = self._engine(request.query.get("engine") or request.query.get("model"))
        if isinstance(engine, web.Response):
            return engine
        try:
            await engine.supervisor.order_wake()
        except OrderFailed as failed:
            return error_response(503, f"wake failed: {failed}", "service_unavailable",
                                  "wake_failed", retry_after=10)
        return web.json_response(self._read_status(engine))

    async def pin(self, request: web.Request) -> web.Response:
        """``{"model": M, "duration": "1h"}``: keep M's engine awake that long (no duration: until
        unpinned); an asleep engine is woken."""
        asked = await self._ordered_engine(request)
        if isinstance(asked, web.Response):
            return asked
        engine, body = asked
        duration = body.get("duration")
        seconds = None
        if duration is not None:
            try:
                seconds = parse_duration(str(duration))
                if not 0 < seconds <= MAX_PIN:
                    raise ValueError(duration)
            except ValueError:
                return error_response(400, f"duration={str(duration)[:40]!r} is invalid: expected "
                                      "a duration above zero and at most a year, such as 30m or "
                                      "2h (or none: until unpinned)", "invalid_request_error",
                                      "bad_duration")
        engine.supervisor.pin(seconds)
        return web.json_response(engine.view())

    async def unpin(self, request: web.Request) -> web.Response:
        asked = await self._ordered_engine(request)
        if isinstance(asked, web.Response):
            return asked
        engine, _ = asked
        engine.supervisor.unpin()
        return web.json_response(engine.view())

    async def _ordered_engine(self, request: web.Request) -> "tuple[HostedEngine, dict] | web.Response":
        """An authorized order's JSON body, and the engine its ``model`` (or ``engine``) names."""
        denied = self._authorize(request)
        if denied is not None:
            return denied
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error_response(400, 'the body must be a JSON object such as {"model": "qwen", '
                                  '"duration": "1h"}', "invalid_request_error", "bad_body")
        engine = self._engine(body.get("model") or body.get("engine"))
        return engine if isinstance(engine, web.Response) else (engine, body)

    async def not_found(self, request: web.Request) -> web.Response:
        return error_response(404, f"no such autosleepd endpoint: {request.method} {request.path}",
                              "not_found", "not_found")

    def _engine(self, named: object) -> "HostedEngine | web.Response":
        """The engine a model or engine name picks; with one engine, naming none picks it."""
        if named is None and self.host.single:
            return self.host.engines[0]
        available = ", ".join(self.host.model_names())
        if not isinstance(named, str) or not named:
            return error_response(400, "this host serves several engines: name a model (or an "
                                  f"engine) with ?model= or 'model' (available: {available})",
                                  "invalid_request_error", "model_required")
        engine = self.host.find(named)
        if engine is None:
            return error_response(404, f"the model {named[:200]!r} does not exist here "
                                  f"(available: {available})", "invalid_request_error",
                                  "model_not_found")
        return engine

    def _authorize(self, request: web.Request) -> web.Response | None:
        if _from_another_site(request):
            return error_response(403, "manual control is refused to a page of another site "
                                  "(Origin or Sec-Fetch-Site says so)", "forbidden", "cross_site")
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


def _from_another_site(request: web.Request) -> bool:
    """A browser's request that another site's page made (a form or a fetch): without a token,
    a loopback address alone would let any web page open on the host order engines about."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin is not None and urlsplit(origin).netloc != request.host


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False

