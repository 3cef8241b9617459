"""A worker process: ``python -m autosleepd.workers.worker LISTEN SEGMENT LINK SLOT SLOTS OWN``
(inherited descriptors, its slot in the segment, the owner's own-endpoint socket), the config
pickled, length first, as the link's first bytes. Started and restarted by the owner
(``owner.py``), never by hand.

It relays the data path with the same lean ``Relay`` as the owner, with a ``WorkerGate`` as the
engine's gate, and sends autosleepd's own endpoints (/autosleepd/...) to the owner's own socket
as the owner's relay does (the client's address last in X-Forwarded-For), so tokens and the
loopback rule hold as if the owner had been asked.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import signal
import socket
import sys

import structlog

from .. import log
from ..cli.main import loop_factory
from ..config import Config
from ..heap import HeapTrimmer
from ..proxy.relay import Relay, Target
from ..proxy.upstream import Upstream
from .gate import WorkerGate, encode
from .shared import SharedAdmission


class RequestCounts:
    """The relay's observer in a worker: counts the owner adds to its metrics at each scrape."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def request(self, kind: str, status: int) -> None:
        key = f"{kind} {status // 100}"
        self.counts[key] = self.counts.get(key, 0) + 1


class _Engine:
    """What the relay reads of a hosted engine."""

    def __init__(self, target: Target):
        self.target = target


class _Host:
    """The host a worker's relay serves: one engine (Config refuses workers beside several)."""

    single = True

    def __init__(self, target: Target):
        self.engines = [_Engine(target)]


class Worker:
    def __init__(self, config: Config, listen_fds: list[int], segment_fd: int, link_fd: int,
                 slot: int, slots: int, own_path: str):
        self.config, self.slot, self.own_path = config, slot, own_path
        self._listen = [socket.socket(fileno=fd) for fd in listen_fds]
        self._shared = SharedAdmission(segment_fd, slots)
        self._link = socket.socket(fileno=link_fd)
        self._log = structlog.get_logger("autosleepd.worker").bind(worker=slot)
        self._stop = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        config = self.config
        reader, writer = await asyncio.open_unix_connection(sock=self._link)
        # A burst of held requests let through leaves its bodies' heap here: trim it after.
        self.gate = WorkerGate(self._shared, self.slot, writer,
                               observer=HeapTrimmer(lambda: self.gate.idle))
        self.counts = RequestCounts()
        engine = Target(Upstream(config.upstream, connect_timeout=config.connect_timeout),
                        self.gate, self.counts)
        self.relay = Relay(config, _Host(engine), Upstream(unix_path=self.own_path))
        listeners = [await loop.create_server(self.relay.protocol, sock=sock, backlog=2048)
                     for sock in self._listen]
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        listening = asyncio.create_task(self._follow_owner(reader))
        writer.write(encode({"op": "ready"}))
        self._log.debug("worker_ready")
        await self._stop.wait()
        # Stop accepting; held work was answered by the owner; in-flight work finishes.
        for listener in listeners:
            listener.close()
        await self.relay.finish(timeout=config.shutdown_timeout)
        listening.cancel()
        writer.close()
        return 0

    async def _follow_owner(self, reader: asyncio.StreamReader) -> None:
        try:
            async for line in reader:
                message = json.loads(line)
                if message["op"] == "report":
                    self.gate.send({"op": "report", "id": message["id"], "counts": self.counts.counts})
                else:
                    self.gate.answer(message)
        except ConnectionError:   # a message written to a dead owner breaks the link this way
            pass
        self._log.warning("owner_gone", hint="the owner process exited: this worker stops")
        self.gate.owner_gone()
        self._stop.set()


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
