"""The front of the port: picks the engine a request is for, then hands it to that engine's proxy.

With one engine nothing is read: every request goes to it as before. With several, the request's
model picks the engine (``route.model_of``): from the path, or from the body, which is then read
whole before the request is held (bounded by AUTOSLEEPD_MAX_BODY_SIZE, else ``ROUTE_BODY_LIMIT``)
and forwarded byte for byte. ``GET /v1/models`` is answered here for the whole host.

Any request may carry ``X-Autosleepd-Keep-Alive: 10m``: its engine stays awake that long after
its last work ends (up to AUTOSLEEPD_KEEP_ALIVE_MAX), until it next sleeps.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..config import Config, parse_duration
from ..host import Host, HostedEngine
from .errors import error_response
from .relay import READ_BODY, continue_now
from .route import NoModel, model_of
from .routes import normalize_path

KEEP_ALIVE_HEADER = "X-Autosleepd-Keep-Alive"
ROUTE_BODY_LIMIT = 100 * 2**20   # a body read to find its model, without AUTOSLEEPD_MAX_BODY_SIZE


class Front:
    def __init__(self, host: Host, config: Config):
        self.host = host
        self._body_limit = config.max_body_size or ROUTE_BODY_LIMIT
        self._patience = config.header_timeout   # longest wait for the next byte of a body read here

    async def handle(self, request: web.Request) -> web.StreamResponse:
        picked = self.host.engines[0] if self.host.single else await self._pick(request)
        if isinstance(picked, web.StreamResponse):
            return picked
        keep_alive = request.headers.get(KEEP_ALIVE_HEADER)
        if keep_alive is not None:
            try:
                seconds = parse_duration(keep_alive)
            except ValueError:
                return error_response(400, f"{KEEP_ALIVE_HEADER}: {keep_alive[:40]!r} is not a "
                                      "duration such as 30s, 10m or 1h", "invalid_request_error",
                                      "bad_keep_alive")
            picked.supervisor.keep_alive(seconds)
        return await picked.proxy.handle(request)

    async def _pick(self, request: web.Request) -> HostedEngine | web.Response:
        default = self.host.engines[0]
        kind = default.proxy.classify(request.path, request.method, request.body_exists)
        if kind == "blocked":
            return default   # its proxy answers 403
        normal = normalize_path(request.path)
        listing = normal == "/v1/models" or normal.startswith("/v1/models/")
        if listing and request.method in ("GET", "HEAD"):
            return self._models(request)
        body = b""
        if kind == "work" and request.body_exists:
            body = await self._read_body(request)
            if isinstance(body, web.Response):
                return body
            request[READ_BODY] = body
        try:
            model = model_of(request.method, request.path, request.headers.get("Content-Type", ""), body)
        except NoModel as problem:
            return error_response(400, f"cannot tell which model this request is for: {problem}",
                                  "invalid_request_error", "bad_model")
        if model is None:
            if kind == "passive":
                return default   # /health, /version, /metrics...: the first engine answers
            return error_response(400, "this endpoint serves several models; name one in the "
                                  f"request's 'model' field (available: {self._available()})",
                                  "invalid_request_error", "model_required")
        engine = self.host.find(model)
        return self._unknown(model) if engine is None else engine

    def _models(self, request: web.Request) -> web.Response:
        """The host's models, asleep or not: all of them, or the one the path names."""
        listed = self.host.models_list()
        model = model_of(request.method, request.path, "", b"")
        if model is None:
            return web.json_response(listed)
        found = next((entry for entry in listed["data"] if entry["id"] == model), None)
        if found is None:
            return self._unknown(model)
        return web.json_response(found)

    def _unknown(self, model: str) -> web.Response:
        return error_response(404, f"the model {model[:200]!r} does not exist here "
                              f"(available: {self._available()})",
                              "invalid_request_error", "model_not_found")

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        limit = self._body_limit
        if request.content_length is not None and request.content_length > limit:
            return _too_large(f"the request body of {request.content_length} bytes is over the "
                              f"limit of {limit} bytes")
        await continue_now(request)
        chunks, size = [], 0
        while True:
            try:
                async with asyncio.timeout(self._patience):
                    chunk = await request.content.readany()
            except TimeoutError:
                response = error_response(408, f"no byte of the request body for {self._patience:g}s",
                                          "invalid_request_error", "body_timeout")
                response.force_close()
                return response
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                return _too_large(f"the request body is over the limit of {limit} bytes")
            chunks.append(chunk)

    def _available(self) -> str:
        return ", ".join(self.host.model_names())


def _too_large(message: str) -> web.Response:
    response = error_response(413, message + " (AUTOSLEEPD_MAX_BODY_SIZE; bodies are read whole "
                              "to find their model)", "invalid_request_error", "body_too_large")
    response.force_close()   # the rest of the body is not read
    return response
