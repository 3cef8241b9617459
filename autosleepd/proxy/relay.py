"""The request path: classify, ask the supervisor, forward with bodies streamed both ways.

The proxy knows nothing about sleeping beyond ``admit``/``release``: a control path is refused,
a passive path is forwarded in any state, and work is forwarded once the supervisor admits it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import time

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from ..config import Config
from ..control.supervisor import Refused, Supervisor
from .errors import error_response, refusal_response
from .routes import Classifier

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})
# Expect is answered here, on release: the engine gets the body at once.
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect"}
# Connecting failed for want of something on this host, not because the engine is down.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                           errno.EADDRNOTAVAIL})
# A body of known length up to this size goes in one piece, so headers and body leave in one
# write (half the syscalls of a small completion); longer bodies and streams are streamed.
WHOLE_BODY_LIMIT = 64 * 1024
UPSTREAM_KEEPALIVE = 4.0   # seconds; vLLM's uvicorn closes idle connections after 5
STALL_AFTER = 1.0   # seconds without response headers before the engine's state is read
# Bodies of released held requests that go upstream at once: a burst of 1,024 held 1 MiB bodies
# released together buffered about 90 KiB each in flight (a 186 MiB peak); this bounds that.
UPLOAD_SLOTS = 64
UPLOAD_PATIENCE = 1.0   # seconds without a byte from its client before a slot is given back


def _forward_headers(headers, extra_hop: frozenset[str]) -> CIMultiDict:
    out = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower not in _NOT_FORWARDED and lower not in extra_hop:
            out.add(name, value)
    return out


def _connection_tokens(headers) -> frozenset[str]:
    """Headers named in Connection are hop-by-hop too."""
    value = headers.get("Connection")
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(","))


class Proxy:
    def __init__(self, config: Config, supervisor: Supervisor):
        self.config = config
        self.supervisor = supervisor
        self._session: aiohttp.ClientSession | None = None
        self._log = structlog.get_logger("autosleepd.proxy")
        self.observer = None   # metrics: .request(kind, status)
        self.classify = Classifier(config.blocked_paths, config.passive_paths)
        self._trusted = config.trusted_proxies
        self.uploads = UploadSlots(UPLOAD_SLOTS, UPLOAD_PATIENCE)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # Idle upstream connections are dropped before uvicorn's 5 s keep-alive closes them,
            # so a request never goes out on a connection the engine is closing.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout),
            auto_decompress=False,               # bytes pass through exactly as vLLM sent them
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        kind = self.classify(request.path, request.method, request.body_exists)
        started = time.monotonic() if self.config.log_requests else 0.0
        response = await self._handle(request, kind)
        if self.observer is not None:
            self.observer.request(kind, response.status)
        if self.config.log_requests:
            self._log.info("request", method=request.method, path=request.path, kind=kind,
                           status=response.status, seconds=round(time.monotonic() - started, 4))
        return response

    async def _handle(self, request: web.Request, kind: str) -> web.StreamResponse:
        if kind == "blocked":
            return error_response(403, f"{request.path} is a vLLM control endpoint; clients may "
                                  "not call it through autosleepd (use /autosleepd/ instead)",
                                  "forbidden", "blocked_path")
        too_large = self._body_too_large(request)
        if too_large is not None:
            return too_large
        if kind == "passive":
            try:
                return await self._forward(request)
            except _NotConnected as failure:   # passive requests are never held: answer now
                self.supervisor.engine_unreachable(str(failure))
                return error_response(502, f"the engine at {self.config.upstream} is not "
                                      "reachable", "bad_gateway", "engine_unavailable", 5)
        return await self._forward_work(request)

    async def _forward_work(self, request: web.Request) -> web.StreamResponse:
        # A body still arriving waits in the client's socket while the request is held, not
        # here: reading resumes (and Expect: 100-continue is answered) once it is admitted.
        paused = request.body_exists and not request.content.is_eof()
        if paused:
            request.protocol.pause_reading()
        until = None   # set at the first failed connect: every retry shares one deadline
        while True:
            try:
                await self.supervisor.admit(until=until)
            except Refused as refused:
                return refusal_response(refused.reason, refused.message, refused.retry_after)
            slot = None
            try:
                if paused:
                    if _streamed(request):
                        slot = await self.uploads.take()
                    request.protocol.resume_reading()
                    paused = False
                return await self._forward(request, work=True, slot=slot)
            except _NotConnected as failure:
                # Nothing reached the engine, so the request is held again until it is back.
                self.supervisor.engine_unreachable(str(failure))
                if until is None:
                    until = self.supervisor.now() + self.config.wake_timeout
            finally:
                if slot is not None:
                    slot.give_back()
                self.supervisor.release()

    def _body_too_large(self, request: web.Request) -> web.Response | None:
        limit = self.config.max_body_size
        if limit and request.content_length is not None and request.content_length > limit:
            return self._too_large(f"the request body of {request.content_length} bytes is over "
                                   f"the limit of {limit} bytes")
        return None

    @staticmethod
    def _too_large(message: str) -> web.Response:
        response = error_response(413, message + " (AUTOSLEEPD_MAX_BODY_SIZE)",
                                  "invalid_request_error", "body_too_large")
        response.force_close()   # the rest of the body is not read
        return response

    def _proxy_headers(self, request: web.Request) -> CIMultiDict:
        """The client's end-to-end headers, and where the request came from (as nginx adds)."""
        headers = _forward_headers(request.headers, _connection_tokens(request.headers))
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        remote = request.remote or ""
        headers["X-Forwarded-For"] = ", ".join(request.headers.getall("X-Forwarded-For", [])
                                               + [remote])
        if not self._is_trusted(remote) or "X-Forwarded-Proto" not in headers:
            headers["X-Forwarded-Proto"] = request.scheme
        if not self._is_trusted(remote) or "X-Forwarded-Host" not in headers:
            headers.popall("X-Forwarded-Host", None)
            if request.host:
                headers["X-Forwarded-Host"] = request.host
        return headers

    def _is_trusted(self, remote: str) -> bool:
        """A front named in AUTOSLEEPD_TRUSTED_PROXIES: its X-Forwarded-Proto/-Host are kept."""
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    async def _forward(self, request: web.Request, work: bool = False,
                       slot: "_UploadSlot | None" = None) -> web.StreamResponse:
        assert self._session is not None
        headers = self._proxy_headers(request)
        await continue_now(request)
        data, limit = await self._request_body(request)
        if slot is not None and data is not None:
            data = slot.carry(request.content.iter_any() if data is request.content else data)
        # path and query only: an absolute-form target (POST http://x/... HTTP/1.1) names us
        target = self.config.upstream + request.rel_url.raw_path_qs
        # Work with no answer after STALL_AFTER may have reached an engine slept behind our back
        # (it then hangs for ever): the supervisor probes. A long plain completion stalls too,
        # so a stall only asks the question.
        stall = asyncio.get_running_loop().call_later(STALL_AFTER, self.supervisor.stalled) if work else None
        try:
            upstream = await self._session.request(
                request.method, target, headers=headers,
                data=data, allow_redirects=False, compress=None)
        except aiohttp.ClientConnectorError as error:
            if getattr(error.os_error, "errno", None) in _LOCAL_ERRNOS:
                self._log.warning("local_resources_exhausted", path=request.path,
                                  error=error.os_error.strerror)
                return error_response(503, "autosleepd is short of local resources (file "
                                      f"descriptors or ports): {error.os_error.strerror}",
                                      "service_unavailable", "proxy_overloaded", 1)
            raise _NotConnected(error) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            if limit is not None and limit.exceeded:
                return self._too_large(f"the request body is over the limit of {limit.limit} bytes")
            return self._upstream_failed(request, "failed before answering", error)
        finally:
            if stall is not None:
                stall.cancel()
        async with upstream:
            headers = _forward_headers(upstream.headers, _connection_tokens(upstream.headers))
            length = upstream.content_length
            if length is not None and length <= WHOLE_BODY_LIMIT and request.method != "HEAD":
                try:
                    body = await upstream.read()
                except (aiohttp.ClientError, TimeoutError) as error:
                    return self._upstream_failed(request, "broke off its answer", error)
                return web.Response(status=upstream.status, reason=upstream.reason, body=body,
                                    headers=headers)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                          headers=headers)
            if length is not None:
                response.content_length = length
            await response.prepare(request)
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (aiohttp.ClientError, TimeoutError) as error:
                    # The engine broke off mid-answer: end the client's connection without the
                    # final chunk, so it sees an error rather than a clean but truncated end.
                    self._log.warning("upstream_broke_mid_response", path=request.path,
                                      error=type(error).__name__)
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
            return response

    def _upstream_failed(self, request: web.Request, what: str, error: Exception) -> web.Response:
        # The class only: an aiohttp error's text can carry the request line and headers.
        name = type(error).__name__
        self._log.warning("upstream_failed", path=request.path, what=what, error=name)
        return error_response(502, f"the engine {what} ({name})", "bad_gateway",
                              "upstream_failed", 5)

    async def _request_body(self, request: web.Request) -> tuple[object, "_BodyLimit | None"]:
        """The body to send upstream: small ones whole (read once, so a retry can resend them),
        the rest streamed and, when their length is unknown, counted against the limit."""
        routed = request.get(READ_BODY)
        if routed is not None:   # read whole already, to route by its model
            return routed, None
        if not request.body_exists:
            return None, None
        if not _streamed(request):
            return await request.read(), None
        if not self.config.max_body_size or request.content_length is not None:
            return request.content, None
        limit = _BodyLimit(self.config.max_body_size)
        return limit.stream(request.content), limit


def _streamed(request: web.Request) -> bool:
    return request.content_length is None or request.content_length > WHOLE_BODY_LIMIT


class UploadSlots:
    """The few places for released held bodies to stream upstream, taken in arrival order."""

    def __init__(self, count: int, patience: float):
        self._free = asyncio.Semaphore(count)
        self.patience = patience

    async def take(self) -> "_UploadSlot":
        await self._free.acquire()
        slot = _UploadSlot(self)
        slot.wait_for_bytes()
        return slot


class _UploadSlot:
    """Given back when its body has gone, or when its client sends nothing for the slots'
    patience: a slow client is cheap to carry and must not hold up the rest."""

    def __init__(self, slots: UploadSlots):
        self._slots: UploadSlots | None = slots
        self._patience: asyncio.TimerHandle | None = None

    def give_back(self) -> None:
        if self._patience is not None:
            self._patience.cancel()
            self._patience = None
        if self._slots is not None:
            self._slots._free.release()
            self._slots = None

    def wait_for_bytes(self) -> None:
        if self._slots is not None:
            if self._patience is not None:
                self._patience.cancel()
            self._patience = asyncio.get_running_loop().call_later(self._slots.patience,
                                                                   self.give_back)

    async def carry(self, chunks):
        try:
            async for chunk in chunks:
                self.wait_for_bytes()
                yield chunk
        finally:
            self.give_back()


class _BodyLimit:
    """Counts a chunked body as it streams; past the limit it stops the upstream request."""

    def __init__(self, limit: int):
        self.limit = limit
        self.exceeded = False

    async def stream(self, content):
        seen = 0
        async for chunk in content.iter_any():
            seen += len(chunk)
            if seen > self.limit:
                self.exceeded = True
                raise ValueError("request body over the limit")
            yield chunk


_CONTINUED = web.RequestKey("continued", bool)   # 100 Continue sent for this request
READ_BODY = web.RequestKey("read_body", bytes)   # the whole body, read before forwarding


async def continue_now(request: web.Request) -> None:
    """Answer ``Expect: 100-continue`` (once): the body is about to be read."""
    if (request.version >= (1, 1) and not request.get(_CONTINUED)
            and request.headers.get("Expect", "").lower() == "100-continue"):
        request[_CONTINUED] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0   # the answer proper has not started


async def defer_continue(request: web.Request) -> None:
    """The route's Expect handler: 100 Continue waits until the request is forwarded."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="the only expectation understood is 100-continue")


class _NotConnected(Exception):
    pass
