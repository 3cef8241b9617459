"""The daemon's lifecycle, like uvicorn's Server: start, serve, shut down.

Shutting down stops accepting, answers held requests (503), lets in-flight work finish within
AUTOSLEEPD_SHUTDOWN_TIMEOUT, then closes. ``serve_forever`` takes the first SIGTERM/SIGINT as a
request to shut down gracefully and a second as an order to exit at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from zoneinfo import ZoneInfo

import structlog
from aiohttp import web

from .clock import Clock, LoopClock
from .config import Config, local_url
from .control.admin import Admin
from .control.engine import EngineClient
from .control.restart import CommandRestarter
from .control.supervisor import Restarter, Supervisor
from .gpu.guard import MemoryGuard
from .heap import HeapTrimmer
from .gpu.neighbours import Coordinator
from .gpu.readers import GpuReader, HostProcesses, Processes, open_nvml
from .metrics import Metrics
from .notify import SystemdNotifier
from .policy.prewake import PrewakeLearner
from .proxy.connections import Connection, Limits
from .proxy.relay import Proxy, defer_continue
from .workers.owner import Workers


RECEIVE_BUFFER = 16 * 1024


async def listen(server: web.Server, config: Config, sock: socket.socket | None = None) -> asyncio.Server:
    """Accept clients for ``server``: on the configured address, or on ``sock`` (a worker's)."""
    limits = Limits(config.max_connections, config.header_timeout)
    loop = asyncio.get_running_loop()

    def connection() -> Connection:
        return Connection(server, limits, loop=loop, access_log=None,
                          keepalive_timeout=config.keepalive_timeout, read_bufsize=RECEIVE_BUFFER)

    # A backlog like uvicorn's: a burst of clients connecting at once must not have its
    # connects dropped (each drop costs the client a one-second SYN retry).
    if sock is not None:
        return await loop.create_server(connection, sock=sock, backlog=2048)
    listener = await loop.create_server(connection, config.host, config.port, backlog=2048,
                                        reuse_address=True)
    for bound in listener.sockets:
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    return listener


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

    async def start(self) -> None:
        config = self.config
        self.engine = EngineClient(config.upstream, config.connect_timeout, config.upstream_api_key)
        await self.engine.start()
        gpu = self._gpu or open_nvml()
        guard = None
        if gpu is None:
            self._log.warning("memory_guard_off", reason="NVML is not available (no GPU or driver "
                              "here): wakes are not checked for GPU memory")
        else:
            guard = MemoryGuard(config, gpu, self._processes or HostProcesses())
        self.metrics = Metrics()
        self.notifier = SystemdNotifier()
        self.coordinator = None
        if config.coordination_dir:
            self.coordinator = Coordinator(config.coordination_dir, self._instance_name(),
                                           request_timeout=config.sleep_timeout)
            self.coordinator.prepare()
        restart = self._restart
        if restart is None and config.restart_command:
            restart = CommandRestarter(config.restart_command)
        learner = None
        if config.prewake == "learned":
            learner = PrewakeLearner(ZoneInfo(config.timezone), lead=config.prewake_lead,
                                     path=Path(config.state_file) if config.state_file else None)
            if config.state_file is None:
                self._log.warning("prewake_state_in_memory", hint="set AUTOSLEEPD_STATE_FILE so "
                                  "what the pre-wake learned survives a restart")
        self.supervisor = Supervisor(config, self.engine, self._clock or LoopClock(),
                                     observers=(self.metrics, self.notifier), guard=guard,
                                     neighbours=self.coordinator, restart=restart, learner=learner)
        self.supervisor.add_observer(HeapTrimmer(lambda: self.supervisor.admission.idle))
        self.metrics.watch(self.supervisor.status,
                           self.coordinator.status if self.coordinator is not None else None)
        self.proxy = Proxy(config, self.supervisor)
        self.proxy.observer = self.metrics
        await self.proxy.start()
        self.admin = Admin(self.supervisor, config.admin_token, config.sleep_level, self._status)
        admin_routes = [web.get("/autosleepd/metrics", self._metrics), *self.admin.routes()]
        app = web.Application()
        app.add_routes(admin_routes)
        app.router.add_route("*", "/{path:.*}", self.proxy.handle, expect_handler=defer_continue)
        # handler_cancellation: a client that goes away cancels its handler, which takes it out
        # of the queue or closes its upstream request (so vLLM aborts the generation).
        # shutdown_timeout: our own drain has already waited; this only lets the handlers of
        # answered requests finish writing.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            self._listener = await listen(self._runner.server, config)
        except OSError:
            await self._close_clients()
            raise
        self.port = self._listener.sockets[0].getsockname()[1]
        self.workers = None
        if config.workers > 1:
            self.workers = Workers(config, self.supervisor, self._listener.sockets, self.metrics)
            await self.workers.start(admin_routes)
        self._tasks = [asyncio.create_task(self.notifier.keep_watchdog_fed())]
        if self.coordinator is not None:
            await self.coordinator.serve(self.supervisor, self.url)
        self._control = asyncio.create_task(self.supervisor.run(), name="autosleepd-control")
        self.notifier.ready(self.supervisor.state.value)
        self._log.info("listening", host=config.host, port=self.port, upstream=config.upstream,
                       idle_timeout_s=config.idle_timeout, sleep_level=config.sleep_level)

    @property
    def url(self) -> str:
        return local_url(self.config.host, self.port)

    async def shutdown(self) -> None:
        self._log.info("shutting_down", in_flight=self.supervisor.admission.in_flight,
                       queued=self.supervisor.admission.queued)
        self.notifier.stopping()
        self._listener.close()                  # no new connections
        if self.workers is not None:
            self.workers.stop_accepting()       # each worker drains its own in-flight work
        self.supervisor.close()                 # held requests get 503, new ones too
        waits = [self.supervisor.wait_drained(self.config.shutdown_timeout)]
        if self.workers is not None:
            waits.append(self.workers.wait_stopped(self.config.shutdown_timeout))
        if not all(await asyncio.gather(*waits)):
            self._log.warning("shutdown_timeout", in_flight=self.supervisor.admission.in_flight)
        if self.workers is not None:
            await self.workers.close()
        self._control.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(self._control, *self._tasks, return_exceptions=True)
        if self.coordinator is not None:
            await self.coordinator.close()
        await self._runner.cleanup()
        await self._close_clients()
        self.notifier.close()
        self._log.info("stopped")

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.workers is not None:
            await self.workers.collect()
        return await self.metrics.handle(request)

    def _status(self) -> dict:
        """The wire form of GET /autosleepd/status."""
        status = self.supervisor.status().to_json()
        if self.coordinator is not None:
            status["coordination"] = self.coordinator.status()
        if self.workers is not None:
            status["workers"] = {"processes": self.config.workers, "exits": self.workers.exits}
        return status

    def _instance_name(self) -> str:
        return self.config.instance or f"{self.config.host.replace(':', '_')}-{self.config.port}"

    async def _close_clients(self) -> None:
        await self.proxy.close()
        await self.engine.close()

    async def serve_forever(self) -> int:
        """Run until a signal (exit 0) or a failure of the control loop (exit 1)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                self._log.warning("forced_exit", signal=signal.Signals(signum).name)
                if self.workers is not None:
                    self.workers.kill()
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
