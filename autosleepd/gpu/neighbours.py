"""The eviction protocol between sidecars that share GPUs, all of it: entry, socket, client.

Each publishes ``<instance>.json`` (its engine's state, GPUs, memory awake, last use, and how
busy it is) on every transition and every heartbeat, and answers eviction requests on
``<instance>.sock``. A waking sidecar that lacks memory asks the least recently used idle
neighbour to sleep; the neighbour decides for itself (it refuses when busy). Wakes and
evictions on one GPU are serialized by ``gpu-<uuid>.lock`` (flock), so two sidecars never wake
into the same free memory. An entry not refreshed for ``STALE_AFTER`` seconds belongs to a
crashed sidecar and is ignored.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable

import aiohttp
import structlog
from aiohttp import web

from ..control.supervisor import Observer, OrderFailed, State, Supervisor
from ..files import write_atomically
from ..proxy.errors import error_response

HEARTBEAT = 2.0
STALE_AFTER = 10.0


class GpuLocks:
    """Exclusive flocks on a set of GPUs, taken in a fixed order so two takers never deadlock."""

    def __init__(self, directory: Path, uuids: list[str]):
        self._paths = [directory / f"gpu-{uuid}.lock" for uuid in sorted(set(uuids))]
        self._files: list = []

    def try_acquire(self) -> bool:
        for path in self._paths[len(self._files):]:
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            self._files.append(handle)
        return True

    def release(self) -> None:
        for handle in reversed(self._files):
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        self._files.clear()


class Coordinator(Observer):
    def __init__(self, directory: str, instance: str, wall: Callable[[], float] = time.time,
                 request_timeout: float = 300.0):
        self.directory = Path(directory)
        self.instance = instance
        self.socket_path = str(self.directory / f"{instance}.sock")
        self._entry_path = self.directory / f"{instance}.json"
        self._wall = wall
        self._timeout = request_timeout
        self._log = structlog.get_logger("autosleepd.coordination")
        self.evictions_asked = 0
        self.evictions_done = 0
        self._supervisor: Supervisor | None = None
        self._url = ""
        self._runner: web.AppRunner | None = None
        self._heartbeat: asyncio.Task | None = None

    def prepare(self) -> None:
        """Make the directory (raises OSError where it cannot be written)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)   # left by a crashed run of this instance

    # ----- serving neighbours -----------------------------------------------------------------

    async def serve(self, supervisor: Supervisor, url: str) -> None:
        """Answer evictions on the socket, publish the entry now, on transitions and heartbeats."""
        self._supervisor, self._url = supervisor, url
        app = web.Application()
        app.router.add_post("/autosleepd/evict", self._evict)
        app.router.add_get("/autosleepd/status", self._status)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.UnixSite(self._runner, self.socket_path).start()
        supervisor.add_observer(self)
        self._heartbeat = asyncio.create_task(self._beat())

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        self.withdraw()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _evict(self, request: web.Request) -> web.Response:
        """A neighbour on the same GPU needs the memory: this sidecar decides (busy: refused)."""
        try:
            await self._supervisor.order_evict()
        except OrderFailed as failed:
            return error_response(409, f"eviction refused: {failed}", "conflict", "busy")
        return web.json_response(self._supervisor.status().to_json())

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self._supervisor.status().to_json())

    async def _beat(self) -> None:
        while True:
            self.publish()
            await asyncio.sleep(HEARTBEAT)

    def entry(self) -> dict:
        """What neighbours see of this sidecar."""
        status = self._supervisor.status()
        memory = status.memory or {}
        gpus = sorted(set(memory.get("engine_awake_bytes", {})) | set(memory.get("last_freed_bytes", {})))
        return {"state": status.state.value, "in_flight": status.in_flight, "queued": status.queued,
                "gpus": gpus or [gpu["uuid"] for gpu in memory.get("gpus", [])],
                "memory_awake": memory.get("engine_awake_bytes", {}),
                "last_used": status.wall - status.idle_seconds, "url": self._url}

    # ----- publishing -------------------------------------------------------------------------

    def publish(self) -> None:
        entry = {**self.entry(), "instance": self.instance, "pid": os.getpid(),
                 "socket": self.socket_path, "updated": self._wall()}
        try:
            write_atomically(self._entry_path, json.dumps(entry))   # never half an entry
        except OSError as error:
            self._log.warning("coordination_publish_failed", error=str(error))

    def transition(self, old: State, new: State, reason: str, seconds: float) -> None:
        self.publish()

    def withdraw(self) -> None:
        for path in (self._entry_path, Path(self.socket_path)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    # ----- neighbours -------------------------------------------------------------------------

    def neighbours(self) -> list[dict]:
        now = self._wall()
        found = []
        for path in self.directory.glob("*.json"):
            if path == self._entry_path:
                continue
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(entry, dict) or now - float(entry.get("updated", 0)) > STALE_AFTER:
                continue   # a crashed sidecar's entry
            found.append(entry)
        return found

    async def evict_for(self, gpu_uuid: str) -> str | None:
        """Ask the least recently used idle awake neighbour on this GPU to sleep.

        Returns the name of the neighbour that slept, or None. The caller still checks the
        memory with NVML: a neighbour's word is not proof that the memory came back.
        """
        # The entry's activity is a hint (refreshed on transitions and heartbeats): the
        # neighbour itself refuses when busy. Idle-looking ones are asked first, oldest use first.
        # An entry without GPUs is a neighbour that has not read them yet (its first seconds):
        # it may be on this GPU, so it is asked too.
        awake = [n for n in self.neighbours()
                 if gpu_uuid in (n.get("gpus") or [gpu_uuid]) and n.get("state") == "awake"]
        for neighbour in sorted(awake, key=lambda n: (bool(n.get("in_flight") or n.get("queued")),
                                                      n.get("last_used", 0))):
            self.evictions_asked += 1
            self._log.info("eviction_asked", neighbour=neighbour["instance"], gpu=gpu_uuid)
            if await self._ask_to_sleep(neighbour):
                self.evictions_done += 1
                self._log.info("eviction_done", neighbour=neighbour["instance"])
                return neighbour["instance"]
        return None

    async def _ask_to_sleep(self, neighbour: dict) -> bool:
        try:
            connector = aiohttp.UnixConnector(path=neighbour["socket"])
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.post("http://sidecar/autosleepd/evict",
                                        timeout=aiohttp.ClientTimeout(total=self._timeout)) as response:
                    if response.status == 200:
                        return True
                    self._log.debug("eviction_refused", neighbour=neighbour["instance"],
                                   status=response.status, answer=(await response.text())[:200])
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            self._log.warning("eviction_failed", neighbour=neighbour.get("instance"), error=repr(error))
        return False

    def locks(self, uuids: list[str]) -> GpuLocks:
        return GpuLocks(self.directory, uuids)

    def status(self) -> dict:
        return {"directory": str(self.directory), "instance": self.instance,
                "neighbours": sorted(n["instance"] for n in self.neighbours()),
                "evictions_asked": self.evictions_asked, "evictions_done": self.evictions_done}
