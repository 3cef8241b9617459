"""The request path: classify, ask the gate, forward, with bodies streamed both ways.

The relay knows nothing about sleeping beyond its gate (``admit``/``release``, see ``Gate``):
a control path is refused, a passive path is forwarded in any state, and work is forwarded once
the gate admits it. Requests for autosleepd's own endpoints (/autosleepd/...) go, through the
same relay, to the aiohttp app that serves them on a private unix socket.

One ``Exchange`` per request. Bytes move in the protocols' callbacks: an answer's body passes
on as the engine's reads bring it, framing included. A request that needs no waiting (engine
awake, an idle engine connection pooled) is forwarded from the callback that parsed it; only one
that waits (held, or for a new connection) has a task.

Per-request upstream choice: each engine of the host is a ``Target`` (its connections, its gate,
its metrics); with several, ``Relay._route`` picks one by the request's model (``route.model_of``,
the body read whole first when the model is in it).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import time
from typing import Protocol
from urllib.parse import unquote

import httptools
import structlog

from ..config import Config, parse_duration
from ..control.supervisor import Refused
from .client import ClientConnection
from .connections import Limits
from .errors import error_bytes, refusal
from .route import NoModel, model_of
from .routes import Classifier, normalize_path
from .upstream import Upstream, UpstreamConnection

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                        b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"})
# In an answer's head (lower case), the hop-by-hop headers that must come out.
_HOP_MARKERS = tuple(b"\r\n" + name + b":" for name in HOP_BY_HOP - {b"transfer-encoding"})
# Host names the engine; Expect is answered here, on release; the length is set from the body.
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-forwarded-for",
                               b"x-forwarded-proto", b"x-forwarded-host"}
# Connecting failed for want of something on this host, not because the engine is down.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                           errno.EADDRNOTAVAIL})
# A held body of known length up to this size is not given an upload slot: it is small enough
# to carry whole.
WHOLE_BODY_LIMIT = 64 * 1024
STALL_AFTER = 1.0   # seconds without response headers before the engine's state is read
# Bodies of released held requests that go upstream at once: a burst of 1,024 held 1 MiB bodies
# released together buffered about 90 KiB each in flight (a 186 MiB peak); this bounds that.
UPLOAD_SLOTS = 64
UPLOAD_PATIENCE = 1.0   # seconds without a byte from its client before a slot is given back
OWN_PREFIX = "/autosleepd/"   # and /autosleepd itself (the live page's redirect)
KEEP_ALIVE_HEADER = b"x-autosleepd-keep-alive"   # an engine stays awake this long after
ROUTE_BODY_LIMIT = 100 * 2**20   # a body read to find its model, without AUTOSLEEPD_MAX_BODY_SIZE
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class Gate(Protocol):
    """What admits work to one engine: the supervisor, or a stand-in for it in a worker process.
    Every admission (``try_admit`` True, or ``admit`` returning) is ended by one ``release``."""

    def try_admit(self) -> bool: ...   # admitted now, without waiting
    async def admit(self, until: float | None = None) -> None: ...   # waits; raises Refused
    def release(self) -> None: ...
    def stalled(self) -> None: ...
    def engine_unreachable(self, detail: str) -> None: ...
    def now(self) -> float: ...
    def keep_alive(self, seconds: float) -> None: ...   # X-Autosleepd-Keep-Alive


class Target:
    """Where a request goes: an upstream's connections, the gate for work sent there (None:
    autosleepd's own endpoints, which are never held), and what counts its requests."""

    __slots__ = ("upstream", "gate", "observer")

    def __init__(self, upstream: Upstream, gate: Gate | None, observer=None):
        self.upstream = upstream
        self.gate = gate
        self.observer = observer   # metrics: .request(kind, status)


class Exchange:
    """One request and its answer. The client connection feeds the request in (head, body
    chunks); the upstream connection feeds the answer in; the relay decides and ends it."""

    __slots__ = ("relay", "client", "url", "headers", "method", "http10", "keep_alive", "length",
                 "chunked", "expect", "host", "hop", "body", "body_done", "body_seen", "conn",
                 "sending", "slot", "status", "head", "head_sent", "close_after", "framing",
                 "task", "finished", "admitted", "kind", "path", "started", "target",
                 "body_arrived")

    def __init__(self, relay: "Relay", client: ClientConnection):
        self.relay = relay
        self.client = client
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []     # body bytes that arrived before the engine could take them
        self.body_done = False
        self.body_seen = 0
        self.conn: UpstreamConnection | None = None
        self.sending = False            # the head went upstream: body bytes follow it directly
        self.slot = None
        self.status = 0
        self.head: bytes | None = None  # the answer's head, written with the first body bytes
        self.head_sent = False
        self.close_after = False
        self.framing = ""
        self.task: asyncio.Task | None = None   # only while waiting: for admission, a connect
        self.finished = False
        self.admitted: Gate | None = None       # to release when the exchange ends
        self.kind: str | None = None            # set once served
        self.target: Target | None = None
        self.body_arrived: asyncio.Event | None = None   # while the body is read to route it

    # ----- the request, from the client connection ----------------------------------------------

    def headers_complete(self, method: bytes, version: str, keep_alive: bool) -> None:
        self.method = method
        self.http10 = version == "1.0"
        self.keep_alive = keep_alive
        self.length = None
        self.chunked = False
        self.expect = None
        self.host = None
        self.hop = ()
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length":
                self.length = int(value)   # llhttp has checked it is a number
            elif lower == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif lower == b"expect":
                self.expect = value.lower()
            elif lower == b"host":
                self.host = value
            elif lower == b"connection":
                self.hop = tuple(token.strip().lower() for token in value.split(b","))
        if not self.chunked and not self.length:
            self.body_done = True   # nothing to wait for; body_complete still comes

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)

    def body_chunk(self, data: bytes) -> None:
        if self.finished:
            return
        self.body_seen += len(data)
        limit = self.relay.config.max_body_size
        if limit and self.body_seen > limit and self.kind is not None:   # else serve() sees it
            self.relay.body_too_large(self)
            return
        if self.slot is not None:
            self.slot.wait_for_bytes()
        if self.sending:
            self.conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        else:
            self.body.append(data)
            if self.body_arrived is not None:
                self.body_arrived.set()

    def body_complete(self) -> None:
        self.body_done = True
        if self.body_arrived is not None:
            self.body_arrived.set()
        if self.slot is not None:
            self.slot.give_back()
            self.slot = None
        if self.sending and self.chunked and self.conn is not None:
            self.conn.write(_LAST_CHUNK)

    def buffered_body(self) -> bytes:
        """What came before the engine's connection, framed for it; later bytes go directly."""
        chunks, self.body = self.body, []
        if self.chunked:
            data = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks)
            return data + _LAST_CHUNK if self.body_done else data
        return b"".join(chunks)

    def client_gone(self) -> None:
        if self.kind is None or self.finished:   # never served, or over
            return
        if self.task is not None and not self.task.done():
            self.task.cancel()   # held or connecting: the task ends the exchange
        else:
            self.relay.complete(self)

    def client_paused(self, paused: bool) -> None:
        """The client reads slower than the engine writes: stop reading the engine."""
        if self.conn is not None:
            self.conn.pause_reading(paused)

    # ----- the answer, from the upstream connection ------------------------------------------

    def response_head(self, status: int, head: bytes, lower: bytes, framing: str) -> bool:
        """The answer's head as the client gets it (``lower``: the same, lower case); True:
        the body passes on framed as it comes."""
        self.relay.answering_started(self)
        self.status = status
        self.framing = framing
        if framing == "close":
            self.close_after = True
        decode = framing == "chunked" and self.http10
        if (not decode and self.keep_alive and not self.close_after and not self.http10
                and head.startswith(b"HTTP/1.1 ") and not any(m in lower for m in _HOP_MARKERS)):
            self.head = head   # the common case: nothing to take out or add
            return True
        lines = head[:-4].split(b"\r\n")
        hop = ()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"connection":
                hop = tuple(token.strip().lower() for token in value.split(b","))
        out = [b"HTTP/1.1 " + lines[0].partition(b" ")[2] + b"\r\n"]
        for line in lines[1:]:
            name = line.partition(b":")[0].lower()
            if name in HOP_BY_HOP or name in hop:
                if name == b"transfer-encoding" and not decode:
                    out.append(line + b"\r\n")   # the chunks pass on as they are
                continue
            out.append(line + b"\r\n")
        if decode:   # no chunks for HTTP/1.0: the body goes decoded, ended by a close
            self.close_after = True
        if self.close_after or not self.keep_alive:
            out.append(b"Connection: close\r\n")
        elif self.http10:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        self.head = b"".join(out)
        return not decode

    def response_bytes(self, data: bytes) -> None:
        if self.head is not None:
            data, self.head = self.head + data, None
            self.head_sent = True
            if self.conn is not None:   # later reads go to the client's socket directly
                self.conn.sink = self.client.transport
        self.client.write(data)

    def response_flush(self) -> None:
        if self.head is not None:
            self.client.write(self.head)
            self.head, self.head_sent = None, True
            if self.conn is not None:
                self.conn.sink = self.client.transport

    def response_end(self, reusable: bool) -> None:
        self.response_flush()
        conn, self.conn = self.conn, None
        if reusable and self.body_done and not self.finished:
            conn.upstream.put_back(conn)
        else:
            conn.close()
        self.relay.complete(self)

    def upstream_lost(self, error: Exception | None) -> None:
        self.conn = None
        if self.framing == "close":   # such a body ends when the engine closes
            self.response_flush()
            self.relay.complete(self)
        else:
            self.relay.upstream_failed(self, error)

    def upstream_paused(self, paused: bool) -> None:
        """The engine takes the body slower than the client sends it: stop reading the client."""
        if paused:
            self.client.pause("upstream")
        else:
            self.client.resume("upstream")


class Relay:
    """``host``: its engines, each with its ``target``; the first answers what names no model.
    ``own``: autosleepd's own app (also the host's ``/v1/models`` when there are several)."""

    def __init__(self, config: Config, host, own: Upstream):
        self.config = config
        self.host = host
        self.engine = host.engines[0].target
        self.own = Target(own, None)
        self.classify = Classifier(config.blocked_paths, config.passive_paths)
        self.uploads = UploadSlots(UPLOAD_SLOTS, UPLOAD_PATIENCE)
        self.limits = Limits(config.max_connections, config.header_timeout)
        self.connections: set[ClientConnection] = set()
        self.answering = 0     # exchanges not yet complete
        self._awaiting_head: dict[Exchange, float] = {}   # work sent, no answer yet: when sent
        self._stall_check: asyncio.TimerHandle | None = None
        self._quiet = asyncio.Event()   # set while none is
        self._quiet.set()
        self._trusted = config.trusted_proxies
        self._log = structlog.get_logger("autosleepd.proxy")

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    def exchange(self, client: ClientConnection) -> Exchange:
        return Exchange(self, client)

    def is_trusted(self, remote: str) -> bool:
        """A front named in AUTOSLEEPD_TRUSTED_PROXIES: its X-Forwarded-Proto/-Host are kept."""
        if not self._trusted:
            return False
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    async def finish(self, timeout: float) -> None:
        """At shutdown, once work has drained: answers still in progress (passive ones) get
        ``timeout`` to end, then every connection both ways is closed."""
        try:
            await asyncio.wait_for(self._quiet.wait(), timeout)
        except TimeoutError:
            pass
        if self._stall_check is not None:
            self._stall_check.cancel()
        for client in list(self.connections):
            client.close() if client.idle else client.abort()
        self.engine.upstream.close()
        self.own.upstream.close()

    # ----- one request --------------------------------------------------------------------------

    def serve(self, exchange: Exchange) -> None:
        """Answer at once where nothing needs waiting for: the request is forwarded from this
        callback; else a task waits (for admission, for a connection) and forwards it."""
        if exchange.client.transport.is_closing():   # a pipelined request whose client left
            return
        exchange.started = time.monotonic() if self.config.log_requests else 0.0
        self.answering += 1
        self._quiet.clear()
        url = exchange.url
        if not url.startswith(b"/") and url != b"*":
            # path and query only: an absolute-form target (POST http://x/... HTTP/1.1) names us
            parsed = httptools.parse_url(url)
            exchange.url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        path = exchange.path = exchange.url.split(b"?", 1)[0].decode("latin-1")
        if path.startswith(OWN_PREFIX) or path == OWN_PREFIX[:-1]:
            exchange.kind = "own"
            self._dispatch(exchange, self.own)
            return
        normal = unquote(path) if "%" in path else path
        kind = exchange.kind = self.classify(normal, exchange.method.decode(), exchange.has_body)
        if kind == "blocked":
            exchange.target = self.engine   # counted in the first engine's metrics
            self._error(exchange, 403, f"{path} is a vLLM control endpoint; clients may not call "
                        "it through autosleepd (use /autosleepd/ instead)", "forbidden", "blocked_path")
            return
        if self.host.single:
            self._dispatch(exchange, self.engine)
        elif kind == "work" and exchange.has_body:
            # Its model is in the body: read it whole first (it is sent on byte for byte).
            limit = self.config.max_body_size or ROUTE_BODY_LIMIT
            if max(exchange.length or 0, exchange.body_seen) > limit:
                self._route_body_too_large(exchange, limit)
            elif not exchange.body_done:
                exchange.task = asyncio.get_running_loop().create_task(self._route_after_body(exchange))
            else:
                self._route(exchange)
        else:
            self._route(exchange)

    def _route_body_too_large(self, exchange: Exchange, limit: int) -> None:
        exchange.close_after = True
        self._error(exchange, 413, f"the request body is over the limit of {limit} bytes "
                    "(AUTOSLEEPD_MAX_BODY_SIZE; bodies are read whole to find their model)",
                    "invalid_request_error", "body_too_large")

    def _route(self, exchange: Exchange) -> None:
        """Several engines: the request's model picks one (``route.model_of``)."""
        normal = normalize_path(unquote(exchange.path))
        if ((normal == "/v1/models" or normal.startswith("/v1/models/"))
                and exchange.method in (b"GET", b"HEAD")):
            exchange.kind = "own"   # the host's models, asleep or not: autosleepd's app answers
            self._dispatch(exchange, self.own)
            return
        content_type = next((v for n, v in exchange.headers if n.lower() == b"content-type"), b"")
        body = b"".join(exchange.body)
        try:
            model = model_of(exchange.method.decode(), exchange.path,
                             content_type.decode("latin-1"), body)
        except NoModel as problem:
            self._error(exchange, 400, f"cannot tell which model this request is for: {problem}",
                        "invalid_request_error", "bad_model")
            return
        if model is None:
            if exchange.kind == "passive":   # /health, /version, /metrics: the first engine
                self._dispatch(exchange, self.engine)
                return
            names = ", ".join(self.host.model_names())
            self._error(exchange, 400, "this endpoint serves several models; name one in the "
                        f"request's 'model' field (available: {names})", "invalid_request_error",
                        "model_required")
            return
        engine = self.host.find(model)
        if engine is None:
            names = ", ".join(self.host.model_names())
            self._error(exchange, 404, f"the model {model[:200]!r} does not exist here "
                        f"(available: {names})", "invalid_request_error", "model_not_found")
            return
        self._dispatch(exchange, engine.target)

    async def _route_after_body(self, exchange: Exchange) -> None:
        """Read the body whole (within the limit, each byte within the header timeout), then
        route. 100 Continue goes first: the body is wanted now."""
        limit = self.config.max_body_size or ROUTE_BODY_LIMIT
        if exchange.expect == b"100-continue" and not exchange.http10 and not exchange.body_seen:
            exchange.client.write(_CONTINUE)
            exchange.expect = None
        exchange.body_arrived = asyncio.Event()
        try:
            while not exchange.body_done:
                exchange.body_arrived.clear()
                try:
                    async with asyncio.timeout(self.config.header_timeout):
                        await exchange.body_arrived.wait()
                except TimeoutError:
                    exchange.close_after = True
                    self._error(exchange, 408, "no byte of the request body for "
                                f"{self.config.header_timeout:g}s", "invalid_request_error",
                                "body_timeout")
                    return
                if exchange.body_seen > limit:
                    self._route_body_too_large(exchange, limit)
                    return
        except asyncio.CancelledError:   # the client went away
            exchange.task = None
            self.complete(exchange)
            return
        exchange.task = exchange.body_arrived = None
        self._route(exchange)

    def _dispatch(self, exchange: Exchange, target: Target) -> None:
        exchange.target = target
        keep_alive = next((v for n, v in exchange.headers if n.lower() == KEEP_ALIVE_HEADER), None)
        if keep_alive is not None and target.gate is not None:
            try:
                seconds = parse_duration(keep_alive.decode("latin-1"))
            except ValueError:
                self._error(exchange, 400, f"X-Autosleepd-Keep-Alive: {keep_alive[:40].decode('latin-1')!r} "
                            "is not a duration such as 30s, 10m or 1h", "invalid_request_error",
                            "bad_keep_alive")
                return
            target.gate.keep_alive(seconds)
        kind = exchange.kind
        limit = self.config.max_body_size
        if limit and max(exchange.length or 0, exchange.body_seen) > limit:
            exchange.close_after = True
            self._error(exchange, 413, f"the request body of {exchange.length or exchange.body_seen}"
                        f"{'' if exchange.length else '+'} bytes is over the limit of {limit} bytes "
                        "(AUTOSLEEPD_MAX_BODY_SIZE)", "invalid_request_error", "body_too_large")
            return
        if exchange.expect is not None and exchange.expect != b"100-continue":
            exchange.close_after = True
            self._error(exchange, 417, "the only expectation understood is 100-continue",
                        "invalid_request_error", "expectation_failed")
            return
        if kind == "work":
            # A body still arriving is held in the client's socket, not here (see _wait).
            if not exchange.body_done or not target.gate.try_admit():
                exchange.task = asyncio.get_running_loop().create_task(self._wait(exchange, target))
                return
            exchange.admitted = target.gate
        conn = target.upstream.idle()
        if conn is None:
            exchange.task = asyncio.get_running_loop().create_task(self._wait(exchange, target))
            return
        self._send(exchange, target, conn)

    async def _wait(self, exchange: Exchange, target: Target) -> None:
        """The slow path: wait to be admitted (work), and for a new connection to the upstream."""
        client, gate = exchange.client, target.gate
        work = exchange.kind == "work"
        held = work and not exchange.body_done and exchange.admitted is None
        until = None   # set at the first failed connect: every retry shares one deadline
        try:
            while True:
                if work and exchange.admitted is None:
                    if held:
                        # Reading resumes (and Expect: 100-continue is answered) once admitted.
                        client.pause("held")
                    try:
                        await gate.admit(until=until)
                    except Refused as refused:
                        status, kind, retry_after = refusal(refused.reason, refused.retry_after)
                        self._error(exchange, status, refused.message, kind, refused.reason,
                                    retry_after)
                        return
                    exchange.admitted = gate
                    if held:
                        if exchange.length is None or exchange.length > WHOLE_BODY_LIMIT:
                            exchange.slot = await self.uploads.take()
                        client.resume("held")
                        held = False
                if (exchange.expect is not None and not exchange.body_done
                        and not exchange.http10 and not exchange.body_seen):
                    client.write(_CONTINUE)
                    exchange.expect = None
                try:
                    conn = await target.upstream.connection()
                except (OSError, TimeoutError) as error:
                    if getattr(error, "errno", None) in _LOCAL_ERRNOS:
                        self._log.warning("local_resources_exhausted", path=exchange.path,
                                          error=error.strerror)
                        self._error(exchange, 503, "autosleepd is short of local resources (file "
                                    f"descriptors or ports): {error.strerror}",
                                    "service_unavailable", "proxy_overloaded", 1)
                        return
                    if gate is not None:
                        gate.engine_unreachable(repr(error))
                    if not work:   # passive requests are never held: answer now
                        self._error(exchange, 502, f"the engine at {target.upstream.name} is not "
                                    "reachable", "bad_gateway", "engine_unavailable", 5)
                        return
                    # Nothing reached the engine, so the request is held again until it is back.
                    if until is None:
                        until = gate.now() + self.config.wake_timeout
                    exchange.admitted = None
                    gate.release()
                    continue
                exchange.task = None
                self._send(exchange, target, conn)
                return
        except asyncio.CancelledError:   # the client went away
            exchange.task = None
            self.complete(exchange)

    def _send(self, exchange: Exchange, target: Target, conn: UpstreamConnection) -> None:
        exchange.conn = conn
        data = self._request_head(exchange, target.upstream) + exchange.buffered_body()
        exchange.sending = True
        conn.send(exchange, data, head_only=exchange.method == b"HEAD", decode=exchange.http10)
        if exchange.admitted is not None:
            self._awaiting_head[exchange] = asyncio.get_running_loop().time()
            if self._stall_check is None:
                self._stall_check = asyncio.get_running_loop().call_later(STALL_AFTER / 2,
                                                                          self._check_stalls)

    def answering_started(self, exchange: Exchange) -> None:
        self._awaiting_head.pop(exchange, None)

    def _check_stalls(self) -> None:
        """Work with no answer after STALL_AFTER may have reached an engine slept behind our back
        (it then hangs for ever): its gate probes. A long plain completion stalls too, so a
        stall only asks the question. One timer for all, ticking while work awaits answers
        (a stall is seen after 1 to 1.5 STALL_AFTER)."""
        now = asyncio.get_running_loop().time()
        for exchange, sent in list(self._awaiting_head.items()):
            if now - sent >= STALL_AFTER:
                del self._awaiting_head[exchange]
                exchange.admitted.stalled()
        self._stall_check = (asyncio.get_running_loop().call_later(STALL_AFTER / 2, self._check_stalls)
                             if self._awaiting_head else None)

    def complete(self, exchange: Exchange) -> None:
        """The exchange is over, answered or not: give back what it held, serve the next."""
        if exchange.finished:
            return
        exchange.finished = True
        self.answering -= 1
        if not self.answering:
            self._quiet.set()
        self._awaiting_head.pop(exchange, None)
        if exchange.conn is not None:   # the answer did not end: the engine must see it go
            exchange.conn.abort()
            exchange.conn = None
        if exchange.slot is not None:
            exchange.slot.give_back()
            exchange.slot = None
        if exchange.admitted is not None:
            exchange.admitted.release()
            exchange.admitted = None
        client_left = exchange.client.transport.is_closing() and not exchange.status
        observer = exchange.target.observer if exchange.target is not None else None
        if observer is not None and not client_left:
            observer.request(exchange.kind, exchange.status)
        if self.config.log_requests:
            self._log.info("request", method=exchange.method.decode(), path=exchange.path,
                           kind=exchange.kind, status=exchange.status,
                           seconds=round(time.monotonic() - exchange.started, 4))
        exchange.client.finished(exchange, exchange.keep_alive and not exchange.close_after)

    def upstream_failed(self, exchange: Exchange, error: Exception | None) -> None:
        name = type(error).__name__ if error is not None else "ServerDisconnected"
        if exchange.head_sent:
            # The engine broke off mid-answer: end the client's connection without the final
            # chunk, so it sees an error rather than a clean but truncated end.
            self._log.warning("upstream_broke_mid_response", path=exchange.path, error=name)
            exchange.client.abort()
            self.complete(exchange)
            return
        # The class only: an error's text can carry the request line and headers.
        self._log.warning("upstream_failed", path=exchange.path, what="failed before answering",
                          error=name)
        exchange.head = None
        exchange.close_after = True
        self._error(exchange, 502, f"the engine failed before answering ({name})", "bad_gateway",
                    "upstream_failed", 5)

    def body_too_large(self, exchange: Exchange) -> None:
        """A body of unknown length went past AUTOSLEEPD_MAX_BODY_SIZE: it goes no further."""
        if exchange.task is not None:
            exchange.task.cancel()
            exchange.task = None
        if exchange.head_sent:
            exchange.client.abort()
            self.complete(exchange)
            return
        exchange.head = None
        exchange.close_after = True
        self._error(exchange, 413, "the request body is over the limit of "
                    f"{self.config.max_body_size} bytes (AUTOSLEEPD_MAX_BODY_SIZE)",
                    "invalid_request_error", "body_too_large")

    def _request_head(self, exchange: Exchange, upstream: Upstream) -> bytes:
        client = exchange.client
        out = [b"%b %b%b HTTP/1.1\r\nHost: %b\r\n" % (exchange.method, upstream.prefix, exchange.url,
                                                       upstream.host_header)]
        forwarded_for, proto, host = [], None, None
        hop = exchange.hop
        for name, value in exchange.headers:
            lower = name.lower()
            if lower in _NOT_FORWARDED or lower in hop:
                if lower == b"x-forwarded-for":
                    forwarded_for.append(value)
                elif lower == b"x-forwarded-proto" and proto is None:
                    proto = value
                elif lower == b"x-forwarded-host" and host is None:
                    host = value
                continue
            out.append(b"%b: %b\r\n" % (name, value))
        if exchange.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif exchange.length is not None:
            out.append(b"Content-Length: %d\r\n" % exchange.length)
        # Where the request came from, as nginx adds it; a trusted front's proto and host stay.
        forwarded_for.append(client.remote.encode())
        out.append(b"X-Forwarded-For: %b\r\n" % b", ".join(forwarded_for))
        if not client.trusted or proto is None:
            proto = b"http"
        out.append(b"X-Forwarded-Proto: %b\r\n" % proto)
        if not client.trusted or host is None:
            host = exchange.host
        if host is not None:
            out.append(b"X-Forwarded-Host: %b\r\n" % host)
        out.append(b"\r\n")
        return b"".join(out)

    def _error(self, exchange: Exchange, status: int, message: str, kind: str, code: str,
               retry_after: int | None = None) -> None:
        """Answer with an error of our own, and end the exchange."""
        close = exchange.close_after or not exchange.keep_alive or not exchange.body_done
        exchange.close_after = close
        exchange.status = status
        exchange.client.write(error_bytes(status, message, kind, code, retry_after, close))
        self.complete(exchange)


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
