"""A worker process: ``python -m autosleepd.workers.worker LISTEN SEGMENT LINK SLOT SLOTS ADMIN``
(inherited descriptors, its slot in the segment, the owner's admin socket path), the config
pickled, length first, as the link's first bytes. Started and restarted by the owner (``owner.py``), never by hand.

It relays the data path with the same ``Proxy`` as the owner, through a ``WorkerGate``, and sends
autosleepd's own endpoints (/autosleepd/...) to the owner over its admin socket with the client's
address last in X-Forwarded-For, so tokens and the loopback rule hold as if the owner had been
asked.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import signal
import socket
import sys

import aiohttp
import structlog
from aiohttp import web

from .. import log
from ..cli.main import loop_factory
from ..config import Config
from ..heap import HeapTrimmer
from ..proxy.relay import HOP_BY_HOP, Proxy, defer_continue
from ..server import listen
from .gate import WorkerGate, encode
from .shared import SharedAdmission

_NOT_PASSED = HOP_BY_HOP | {"host", "content-length", "x-forwarded-for"}


class RequestCounts:
    """The relay's observer in a worker: counts the owner adds to its metrics at each scrape."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def request(self, kind: str, status: int) -> None:
        key = f"{kind} {status // 100}"
        self.counts[key] = self.counts.get(key, 0) + 1


class Worker:
    def __init__(self, config: Config, listen_fds: list[int], segment_fd: int, link_fd: int,
                 slot: int, slots: int, admin_path: str):
        self.config, self.slot, self.admin_path = config, slot, admin_path
        self._listen = [socket.socket(fileno=fd) for fd in listen_fds]
        self._shared = SharedAdmission(segment_fd, slots)
        self._link = socket.socket(fileno=link_fd)
        self._log = structlog.get_logger("autosleepd.worker").bind(worker=slot)
        self._stop = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_unix_connection(sock=self._link)
        # A burst of held requests let through leaves its bodies' heap here: trim it after.
        self.gate = WorkerGate(self._shared, self.slot, writer,
                               observer=HeapTrimmer(lambda: self.gate.idle))
        self.proxy = Proxy(self.config, self.gate)
        self.counts = self.proxy.observer = RequestCounts()
        await self.proxy.start()
        self._owner = aiohttp.ClientSession(connector=aiohttp.UnixConnector(self.admin_path),
                                            timeout=aiohttp.ClientTimeout(total=None),
                                            auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/autosleepd/{rest:.*}", self.to_owner)
        app.router.add_route("*", "/{path:.*}", self.proxy.handle, expect_handler=defer_continue)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        listeners = [await listen(runner.server, self.config, sock=sock) for sock in self._listen]
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        listening = asyncio.create_task(self._follow_owner(reader))
        writer.write(encode({"op": "ready"}))
        self._log.debug("worker_ready")
        await self._stop.wait()
        # Stop accepting; held work was answered by the owner; in-flight work finishes.
        for listener in listeners:
            listener.close()
        deadline = loop.time() + self.config.shutdown_timeout
        while not self.gate.idle and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await runner.cleanup()
        await self.proxy.close()
        await self._owner.close()
        listening.cancel()
        writer.close()
        return 0

    async def _follow_owner(self, reader: asyncio.StreamReader) -> None:
        """The owner's answers, until its link ends; then (or if following it fails) this worker
        stops: a worker without its owner must never serve on, nor outlive it."""
        try:
            async for line in reader:
                message = json.loads(line)
                if message["op"] == "report":
                    self.gate.send({"op": "report", "id": message["id"], "counts": self.counts.counts})
                else:
                    self.gate.answer(message)
            self._log.warning("owner_gone", hint="the owner process exited: this worker stops")
        except Exception:
            self._log.exception("owner_link_failed", hint="this worker stops; the owner restarts it")
            raise
        finally:
            self.gate.owner_gone()
            self._stop.set()

    async def to_owner(self, request: web.Request) -> web.Response:
        headers = {name: value for name, value in request.headers.items()
                   if name.lower() not in _NOT_PASSED}
        # The client's address last, as the owner's admin socket reads it (and nginx writes it).
        headers["X-Forwarded-For"] = ", ".join(request.headers.getall("X-Forwarded-For", [])
                                               + [request.remote or ""])
        body = await request.read() if request.body_exists else None
        async with self._owner.request(request.method, "http://owner" + request.rel_url.raw_path_qs,
                                       headers=headers, data=body) as answer:
            return web.Response(status=answer.status, body=await answer.read(),
                                headers={name: value for name, value in answer.headers.items()
                                         if name.lower() not in _NOT_PASSED})


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise SystemExit("autosleepd worker: the owner went away before sending the config")
        data += chunk
    return data


def main(argv: list[str]) -> int:
    link = socket.socket(fileno=int(argv[2]))
    size = int.from_bytes(_read(link, 8), "big")
    config: Config = pickle.loads(_read(link, size))
    link.detach()
    log.configure(config.log_level, config.log_format)
    segment_fd, link_fd, slot, slots = (int(arg) for arg in argv[1:5])
    worker = Worker(config, [int(fd) for fd in argv[0].split(",")], segment_fd, link_fd, slot,
                    slots, argv[5])
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        return runner.run(worker.run())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
