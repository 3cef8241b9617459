"""The owner's side of the workers: starting and restarting them, answering their links, and
letting each engine's supervisor see their activity.

Per worker, a link task answers ``hold`` (the engine's supervisor's own ``admit``, so a worker's
held request waits in the one queue, under the one bound and the one wake), ``cancel``,
``release``, ``stalled``, ``unreachable`` and ``keep_alive``; every message about work names its
engine. A worker that exits unasked is noticed at once (its process is awaited): whatever it had
in flight is written off (its lines reset, what the owner admitted for it released) and it is
started again. Each engine's supervisor reads the workers' in-flight counts and last activity
from that engine's shared segment (``Admission.elsewhere``). The workers route by model with the
names the owner learned, sent to them at their start and at each change.
"""
from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import socket
import sys

import structlog

from ..control.interfaces import Refused
from .gate import encode
from .shared import SharedAdmission

START_TIMEOUT = 30.0    # for a worker to say it is ready
RESTART_BACKOFF = 1.0   # a worker that dies within this of its start is restarted after it
REPORT_TIMEOUT = 1.0    # for a worker's counts at a metrics scrape


class _Link:
    """One worker process and its end of the link."""

    def __init__(self, owner: "Workers", slot: int, process: asyncio.subprocess.Process,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.owner, self.slot, self.process = owner, slot, process
        self.reader, self.writer = reader, writer
        self.holds: dict[tuple[int, int], asyncio.Task] = {}   # by (engine, the worker's id)
        self.admitted = [0] * len(owner.engines)   # per engine: admitted here, not yet released
        self.reported: list[dict[str, int]] = [{} for _ in owner.engines]   # counts added so far
        self._reports: dict[int, asyncio.Future] = {}
        self._next_report = 0
        self.written_off = False

    def send(self, message: dict) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))

    async def serve(self) -> None:
        async for line in self.reader:
            if self.written_off:
                # Its exit was handled first (both came in one loop turn): its work is released
                # already, so a late release would count twice and a late hold never end.
                return
            message = json.loads(line)
            op = message["op"]
            if op == "report":
                future = self._reports.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message["counts"])
                continue
            engine = message["engine"]
            supervisor = self.owner.engines[engine].supervisor
            if op == "hold":
                key = (engine, message["id"])
                self.holds[key] = asyncio.create_task(self._hold(key, message["wait"]))
            elif op == "cancel":
                task = self.holds.pop((engine, message["id"]), None)
                if task is not None:
                    task.cancel()
            elif op == "release":
                self.admitted[engine] -= 1
                supervisor.release()
            elif op == "stalled":
                supervisor.stalled()
            elif op == "unreachable":
                supervisor.engine_unreachable(message["detail"])
            elif op == "keep_alive":
                supervisor.keep_alive(message["seconds"])

    async def _hold(self, key: tuple[int, int], wait: float | None) -> None:
        engine, number = key
        supervisor = self.owner.engines[engine].supervisor
        try:
            await supervisor.admit(None if wait is None else supervisor.now() + wait)
        except Refused as refused:
            self.send({"op": "refused", "id": number, "engine": engine, "reason": refused.reason,
                       "message": refused.message, "retry_after": refused.retry_after})
        else:
            self.admitted[engine] += 1
            self.send({"op": "admitted", "id": number, "engine": engine})
        finally:
            self.holds.pop(key, None)

    async def report(self) -> dict[str, int]:
        number, self._next_report = self._next_report, self._next_report + 1
        future = self._reports[number] = asyncio.get_running_loop().create_future()
        self.send({"op": "report", "id": number})
        try:
            async with asyncio.timeout(REPORT_TIMEOUT):
                return await future
        finally:
            self._reports.pop(number, None)

    def write_off(self) -> None:
        """The worker is gone: its holds leave the queue, what it had in flight is over."""
        self.written_off = True
        for task in self.holds.values():
            task.cancel()
        self.holds.clear()
        for engine, admitted in zip(self.owner.engines, self.admitted):
            for _ in range(admitted):
                engine.supervisor.release()
        self.admitted = [0] * len(self.admitted)
        self.writer.close()


class Workers:
    """``count`` worker processes serving ``listeners`` for every engine of ``host``: one shared
    segment per engine, so a worker has one gate per engine, each with its own flag and counts."""

    def __init__(self, config, host, listeners):
        self.config, self.host = config, host
        self.engines = host.engines
        self.metrics = host.engines[0].metrics   # worker exits: in the first engine's series
        # Its own copies: a worker restarted after the owner stopped accepting still gets them.
        self._listeners = [os.dup(sock.fileno()) for sock in listeners]
        self.count = config.workers - 1
        self.shared = [SharedAdmission.create(self.count) for _ in self.engines]
        self.links: dict[int, _Link] = {}
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self.exits = 0                 # workers that exited unasked (and were restarted)
        self._log = structlog.get_logger("autosleepd.workers")

    async def start(self, own_path: str) -> None:
        """Start the workers; ``own_path``: the owner's own-endpoint socket, where their relays
        send autosleepd's own endpoints (with the client's address last in X-Forwarded-For)."""
        self._own_path = own_path
        for engine, shared in zip(self.engines, self.shared):
            engine.supervisor.admission.elsewhere = shared
            engine.supervisor.share_admission()
        self.host.names_watchers.append(self._tell_names)
        await asyncio.gather(*(self._start(slot) for slot in range(self.count)))

    async def _start(self, slot: int) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listeners, segments = self._listeners, [shared.fd for shared in self.shared]
        with theirs:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "autosleepd.workers.worker", ",".join(map(str, listeners)),
                ",".join(map(str, segments)), str(theirs.fileno()), str(slot), str(self.count),
                self._own_path, pass_fds=(*listeners, *segments, theirs.fileno()))
        reader, writer = await asyncio.open_unix_connection(sock=mine)
        config = pickle.dumps(self.config)
        writer.write(len(config).to_bytes(8, "big") + config)   # the worker's first read
        link = self.links[slot] = _Link(self, slot, process, reader, writer)
        if self._stopping:   # restarted while the owner began to stop: this one stops too
            process.send_signal(signal.SIGTERM)
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(START_TIMEOUT):
                ready = await reader.readline()
        except TimeoutError:
            ready = b""
        if json.loads(ready or b"{}").get("op") != "ready":
            self._log.error("worker_not_ready", worker=slot, pid=process.pid)
            process.kill()
        link.send(self._names())
        self._spawn(link.serve())
        self._spawn(self._follow(link, started))
        self._log.debug("worker_started", worker=slot, pid=process.pid)

    async def _follow(self, link: _Link, started: float) -> None:
        code = await link.process.wait()
        link.write_off()
        for engine, shared in zip(self.engines, self.shared):
            shared.reset(link.slot)
            engine.supervisor.notice()
        if self._stopping:
            return
        self.exits += 1
        self.metrics.worker_exits.inc()
        self._log.error("worker_exited", worker=link.slot, pid=link.process.pid, code=code,
                        hint="restarting it; its in-flight requests were cut")
        loop = asyncio.get_running_loop()
        if loop.time() - started < RESTART_BACKOFF:
            await asyncio.sleep(RESTART_BACKOFF)
        if not self._stopping:
            await self._start(link.slot)

    async def collect(self) -> None:
        """Add what each worker relayed since the last scrape to the owner's metrics."""
        links = list(self.links.values())
        reports = await asyncio.gather(*(link.report() for link in links), return_exceptions=True)
        for link, counts in zip(links, reports):
            if isinstance(counts, BaseException):
                continue
            for engine, now, before in zip(self.engines, counts, link.reported):
                for key, total in now.items():
                    kind, status_class = key.split()
                    engine.metrics.request(kind, int(status_class) * 100, total - before.get(key, 0))
            link.reported = counts

    def _names(self) -> dict:
        """Each engine's model names as learned here: the workers route by them."""
        return {"op": "models", "names": [list(engine.models.names) for engine in self.engines]}

    def _tell_names(self) -> None:
        for link in self.links.values():
            link.send(self._names())

    def stop_accepting(self) -> None:
        """SIGTERM: each worker stops accepting and lets its in-flight work finish."""
        self._stopping = True
        for fd in self._listeners:
            os.close(fd)
        self._listeners = []
        for link in self.links.values():
            if link.process.returncode is None:
                link.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """A forced exit: the workers go at once too (they would drain for the shutdown timeout)."""
        for link in self.links.values():
            if link.process.returncode is None:
                link.process.kill()

    async def wait_stopped(self, timeout: float) -> bool:
        processes = [link.process for link in self.links.values()]
        done, pending = await asyncio.wait([asyncio.create_task(p.wait()) for p in processes],
                                           timeout=timeout) if processes else (set(), set())
        for process in processes:
            if process.returncode is None:
                process.kill()
        for task in pending:
            await task
        return not pending

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.host.names_watchers.remove(self._tell_names)
        for engine, shared in zip(self.engines, self.shared):
            engine.supervisor.admission.elsewhere = None
            shared.close_segment()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
