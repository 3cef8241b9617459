"""A worker process: ``python -m autosleepd.workers.worker LISTEN SEGMENTS LINK SLOT SLOTS OWN``
(inherited descriptors: listening sockets, one segment per engine, the link; its slot in the
segments, the owner's own-endpoint socket), the config pickled, length first, as the link's
first bytes. Started and restarted by the owner (``owner.py``), never by hand.

It relays the data path with the same lean ``Relay`` as the owner, with a ``WorkerGate`` as each
engine's gate (routing by model on a host of several, with the names the owner learned), and
sends autosleepd's own endpoints (/autosleepd/...) to the owner's own socket as the owner's relay does (the client's address last in X-Forwarded-For), so tokens and the
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
from ..cli.main import exit_now, loop_factory
from ..config import Config
from ..heap import HeapTrimmer
from ..host import Host
from ..proxy.relay import Relay, Target
from ..proxy.upstream import Upstream
from .gate import WorkerGate, encode
from .shared import SharedAdmission


class RequestCounts:
    """The relay's observer of one engine in a worker: counts the owner adds to that engine's
    metrics at each scrape."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def request(self, kind: str, status: int) -> None:
        key = f"{kind} {status // 100}"
        self.counts[key] = self.counts.get(key, 0) + 1


class _Names:
    """An engine's model names as the owner learned them (the host's routing reads them)."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.on_change = None


class _Engine:
    """What the relay and the host read of a hosted engine, in a worker."""

    def __init__(self, name: str, target: Target):
        self.name, self.target, self.models = name, target, _Names()


class Worker:
    def __init__(self, config: Config, listen_fds: list[int], segment_fds: list[int], link_fd: int,
                 slot: int, slots: int, own_path: str):
        self.config, self.slot, self.own_path = config, slot, own_path
        self._listen = [socket.socket(fileno=fd) for fd in listen_fds]
        self._shared = [SharedAdmission(fd, slots) for fd in segment_fds]   # one per engine
        self._link = socket.socket(fileno=link_fd)
        self._log = structlog.get_logger("autosleepd.worker").bind(worker=slot)
        self._stop = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        config = self.config
        reader, writer = await asyncio.open_unix_connection(sock=self._link)
        # A burst of held requests let through leaves its bodies' heap here: trim it after.
        trimmer = HeapTrimmer(lambda: all(gate.idle for gate in self.gates))
        self.gates = [WorkerGate(shared, self.slot, writer, engine=index, observer=trimmer)
                      for index, shared in enumerate(self._shared)]
        self.counts = [RequestCounts() for _ in self.gates]
        self.host = Host([_Engine(name, Target(Upstream(url, connect_timeout=config.connect_timeout),
                                               gate, counts))
                          for (name, url), gate, counts in zip(config.engine_urls, self.gates,
                                                               self.counts)])
        self.relay = Relay(config, self.host, Upstream(unix_path=self.own_path))
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
        for engine in self.host.engines[1:]:   # the relay closes the first engine's pool
            engine.target.upstream.close()
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
                    self.gates[0].send({"op": "report", "id": message["id"],
                                        "counts": [counts.counts for counts in self.counts]})
                elif message["op"] == "models":
                    for engine, names in zip(self.host.engines, message["names"]):
                        engine.models.names = tuple(names)
                else:
                    self.gates[message["engine"]].answer(message)
            self._log.warning("owner_gone", hint="the owner process exited: this worker stops")
        except Exception:
            self._log.exception("owner_link_failed", hint="this worker stops; the owner restarts it")
            raise
        finally:
            for gate in self.gates:
                gate.owner_gone()
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
    link_fd, slot, slots = (int(arg) for arg in argv[2:5])
    worker = Worker(config, [int(fd) for fd in argv[0].split(",")],
                    [int(fd) for fd in argv[1].split(",")], link_fd, slot, slots, argv[5])
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        exit_now(runner.run(worker.run()))   # without waiting for a hung DNS lookup, as the owner


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
