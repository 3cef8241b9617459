"""The daemon's lifecycle, like uvicorn's Server: start, serve, shut down.

Shutting down stops accepting, answers held requests (503), lets in-flight work finish within
AUTOSLEEPD_SHUTDOWN_TIMEOUT, then closes. ``serve_forever`` takes the first SIGTERM/SIGINT as a
request to shut down gracefully and a second as an order to exit at once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import replace

import structlog
from aiohttp import web

from . import log
from .clock import Clock, LoopClock
from .config import Config, local_url
from .control.admin import Admin
from .control.supervisor import Restarter
from .gpu.readers import GpuReader, HostProcesses, Processes, open_nvml
from .host import Host, HostedEngine
from .notify import SystemdNotifier
from .proxy.errors import error_response
from .proxy.relay import Relay
from .proxy.route import model_of
from .proxy.upstream import Upstream
from .ui import add_page_routes
from .workers.owner import Workers


RECEIVE_BUFFER = 16 * 1024


@web.middleware
async def _client_address(request: web.Request, handler):
    """Only the relay reaches the own-endpoint socket: it puts the client's address last in
    X-Forwarded-For, and the host the client asked for in X-Forwarded-Host."""
    forwarded = request.headers.get("X-Forwarded-For", "")
    return await handler(request.clone(remote=forwarded.rpartition(",")[2].strip() or None,
                                       host=request.headers.get("X-Forwarded-Host", request.host)))


class StartError(Exception):
    """autosleepd cannot start here; the message says why and what to set."""


class Autosleepd:
    def __init__(self, config: Config, clock: Clock | None = None, gpu: GpuReader | None = None,
                 processes: Processes | None = None, restart: Restarter | None = None):
        self.config = config
        self._restart = restart
        self._clock = clock
        self._gpu = gpu
        self._processes = processes
        self._log = structlog.get_logger("autosleepd")
        self.port: int | None = None
        self._private_dir: str | None = None
        self.workers: Workers | None = None   # AUTOSLEEPD_WORKERS above 1

    async def start(self) -> None:
        config = self.config
        gpu = self._gpu or open_nvml()
        if gpu is None:
            self._log.warning("memory_guard_off", reason="NVML is not available (no GPU or driver "
                              "here): wakes are not checked for GPU memory")
        shared = replace(config, instance=config.instance or self._instance_name())
        if len(config.engine_urls) > 1 and config.coordination_dir is None:
            # Engines of one process evict each other by the same protocol as separate sidecars.
            try:
                self._private_dir = tempfile.mkdtemp(prefix="autosleepd-")
            except OSError as error:
                raise StartError(f"cannot make the engines' coordination directory in "
                                 f"{tempfile.gettempdir()} ({error.strerror}): set "
                                 "AUTOSLEEPD_COORDINATION_DIR to a writable directory") from None
            shared = replace(shared, coordination_dir=self._private_dir)
        clock = self._clock or LoopClock()
        engines = [HostedEngine(name, shared.for_engine(name, url), clock, gpu,
                                self._processes or HostProcesses(), self._restart)
                   for name, url in config.engine_urls]
        self.host = Host(engines)
        first = engines[0]
        # The first engine's parts, by the names a single-engine instance has always had.
        self.engine, self.supervisor = first.client, first.supervisor
        self.metrics, self.coordinator, self.power = first.metrics, first.coordinator, first.power
        self.notifier = SystemdNotifier()
        for engine in engines:
            engine.supervisor.add_observer(self.notifier.watch(engine.name, engine.supervisor.state))
        try:
            for engine in engines:
                await engine.start()
        except OSError:
            await self._close_clients()
            raise
        self.admin = Admin(self.host, config.admin_token, config.sleep_level, self._status)
        # autosleepd's own endpoints (and, with several engines, the host's /v1/models): an
        # aiohttp app on a private unix socket, reached through the relay like any upstream, so
        # one parser and one set of connection rules face clients; the relay passes the
        # client's address last in X-Forwarded-For.
        app = web.Application(middlewares=[_client_address])
        app.router.add_get("/autosleepd/metrics", self._metrics)
        add_page_routes(app)
        app.add_routes(self.admin.routes())
        if not self.host.single:
            app.router.add_get("/v1/models", self._models)
            app.router.add_get("/v1/models/{model:.*}", self._models)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        self._own_dir = tempfile.mkdtemp(prefix="autosleepd-")   # mode 0700: ours alone
        own_socket = os.path.join(self._own_dir, "own.sock")
        await web.UnixSite(self._runner, own_socket).start()
        self.relay = Relay(config, self.host, Upstream(unix_path=own_socket))
        loop = asyncio.get_running_loop()
        # A backlog like uvicorn's: a burst of clients connecting at once must not have its
        # connects dropped (each drop costs the client a one-second SYN retry).
        try:
            self._listener = await loop.create_server(self.relay.protocol, config.host, config.port,
                                                      backlog=2048, reuse_address=True)
        except OSError:
            await self._runner.cleanup()
            shutil.rmtree(self._own_dir, ignore_errors=True)
            await self._close_clients()
            raise
        for sock in self._listener.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.port = self._listener.sockets[0].getsockname()[1]
        if config.workers > 1:
            self.workers = Workers(config, self.host, self._listener.sockets)
            await self.workers.start(own_socket)
        self._tasks = [asyncio.create_task(self.notifier.keep_watchdog_fed())]
        for engine in engines:
            await engine.serve(self.url)
        self._control = (engines[0].control if self.host.single else
                         asyncio.create_task(_first_to_end([e.control for e in engines]),
                                             name="autosleepd-control"))
        self.notifier.ready()
        self._log.info("listening", host=config.host, port=self.port,
                       engines={e.name: e.config.upstream for e in engines},
                       upstream=config.upstream, idle_timeout_s=config.idle_timeout,
                       sleep_level="auto" if config.sleep_level_auto else config.sleep_level)

    @property
    def url(self) -> str:
        return local_url(self.config.host, self.port)

    async def shutdown(self) -> None:
        engines = self.host.engines
        self._log.info("shutting_down", in_flight=sum(e.supervisor.admission.in_flight for e in engines),
                       queued=sum(e.supervisor.admission.queued for e in engines))
        self.notifier.stopping()
        self._listener.close()                  # no new connections
        if self.workers is not None:
            self.workers.stop_accepting()       # each worker drains its own in-flight work
        for engine in engines:
            engine.supervisor.close()           # held requests get 503, new ones too
        waits = [e.supervisor.wait_drained(self.config.shutdown_timeout) for e in engines]
        if self.workers is not None:
            waits.append(self.workers.wait_stopped(self.config.shutdown_timeout))
        if not all(await asyncio.gather(*waits)):
            self._log.warning("shutdown_timeout",
                              in_flight=sum(e.supervisor.admission.in_flight for e in engines))
        if self.workers is not None:
            await self.workers.close()
        self._control.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(self._control, *self._tasks, return_exceptions=True)
        await self.relay.finish(timeout=1.0)   # answers in progress (passive ones) end
        for engine in engines:
            await engine.stop()
        await self._runner.cleanup()
        shutil.rmtree(self._own_dir, ignore_errors=True)
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        self.notifier.close()
        self._log.info("stopped")

    async def _models(self, request: web.Request) -> web.Response:
        """GET /v1/models on a host of several: its models, asleep or not; all of them, or the
        one the path names."""
        listed = self.host.models_list()
        model = model_of(request.method, request.path, "", b"")
        if model is None:
            return web.json_response(listed)
        found = next((entry for entry in listed["data"] if entry["id"] == model), None)
        if found is None:
            return error_response(404, f"the model {model[:200]!r} does not exist here "
                                  f"(available: {', '.join(self.host.model_names())})",
                                  "invalid_request_error", "model_not_found")
        return web.json_response(found)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        """One engine's series; on a host of several, ?engine=NAME says which."""
        name = request.query.get("engine")
        if self.workers is not None:
            await self.workers.collect()
        if name is None and self.host.single:
            return await self.metrics.handle(request)
        engine = self.host.by_name.get(name or "")
        if engine is None:
            return web.json_response({"error": {
                "message": f"?engine= names one of {', '.join(self.host.by_name)}: this host "
                           "serves several engines, and each has its own series",
                "type": "invalid_request_error", "param": "engine", "code": "unknown_engine"}},
                status=400 if name is None else 404)
        return await engine.metrics.handle(request)

    def _status(self, engine: HostedEngine) -> dict:
        """The wire form of GET /autosleepd/status for one engine."""
        status = engine.supervisor.status().to_json()
        if engine.coordinator is not None:
            status["coordination"] = engine.coordinator.status()
        if self.workers is not None:
            status["workers"] = {"processes": self.config.workers, "exits": self.workers.exits}
        return status

    def _instance_name(self) -> str:
        return self.config.instance or f"{self.config.host.replace(':', '_')}-{self.config.port}"

    async def _close_clients(self) -> None:
        for engine in self.host.engines:
            await engine.close_clients()

    async def serve_forever(self) -> int:
        """Run until a signal (exit 0) or a failure of the control loop (exit 1)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                self._log.warning("forced_exit", signal=signal.Signals(signum).name)
                if self.workers is not None:
                    self.workers.kill()
                log.drain()   # os._exit runs no exit handlers
                os._exit(1)
            self._log.info("signal", signal=signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, self._control}, return_when=asyncio.FIRST_COMPLETED)
        if self._control.done() and not stop.is_set():
            error = self._control.exception() if not self._control.cancelled() else None
            self._log.error("control_loop_failed", error=repr(error), exc_info=error)
            stopping.cancel()
            await self.shutdown()
            return 1
        await self.shutdown()
        return 0


async def _first_to_end(tasks: list[asyncio.Task]) -> None:
    """Ends (with its error) as soon as one engine's control loop does: none may die silently."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        task.result()
