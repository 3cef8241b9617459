"""What a stop and a start command reach for a simulated engine, as ``systemctl stop/start``.

A small HTTP endpoint in the process that holds the ``SimulatedEngine``: ``POST /stop`` kills it
(its port refuses, its GPU memory and draw are given back), ``POST /start`` starts it again on the
same port. ``command("stop")`` is the shell command (curl) that autosleepd is configured with.
Closing ``gate`` plays a slow load: the start command returns, the engine comes up once it opens.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .engine import SimulatedEngine


class Launcher:
    def __init__(self, engine: SimulatedEngine):
        self.engine = engine
        self.gate = asyncio.Event()
        self.gate.set()
        self.starts = self.stops = 0
        self.port = 0
        self._loading: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None

    async def open(self) -> None:
        app = web.Application()
        app.router.add_post("/start", self._start)
        app.router.add_post("/stop", self._stop)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def command(self, what: str) -> str:
        return f"curl -fsS -X POST http://127.0.0.1:{self.port}/{what}"

    async def _start(self, request: web.Request) -> web.Response:
        self.starts += 1
        self._loading = asyncio.create_task(self._load())
        if self.gate.is_set():
            await self._loading   # a fast engine: up by the time the command returns
        return web.Response(text="started\n")

    async def _load(self) -> None:
        await self.gate.wait()
        if not self.engine.listening:
            await self.engine.start()

    async def _stop(self, request: web.Request) -> web.Response:
        self.stops += 1
        await self.engine.kill()
        return web.Response(text="stopped\n")

    async def close(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
        await self._runner.cleanup()
        await self.engine.close()
