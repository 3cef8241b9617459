"""systemd's notify protocol (sd_notify(3)) over its datagram socket: READY, STATUS, WATCHDOG.

STATUS (what `systemctl status` shows) names each engine's state, the reason of its last move
beside it. Outside systemd (no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Mapping

import structlog

from .control.supervisor import Observer, State


class SystemdNotifier:
    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self._engines: dict[str, str] = {}   # each engine's state (and reason), in the host's order
        self._log = structlog.get_logger("autosleepd.notify")
        self._address: str | None = None
        self._socket: socket.socket | None = None
        address = env.get("NOTIFY_SOCKET")
        if address and address[0] in "/@":
            # An address starting with @ is in the abstract namespace.
            self._address = "\0" + address[1:] if address[0] == "@" else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if self._socket and usec and usec.isdigit() and int(usec) > 0 and (
                not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2   # ping twice per period, as advised

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *fields: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as error:
            self._log.warning("notify_failed", error=str(error))

    def watch(self, name: str, state: State) -> Observer:
        """An engine to name in STATUS: the observer to give its supervisor."""
        self._engines[name] = state.value
        return _EngineStatus(self, name)

    def ready(self) -> None:
        self.send("READY=1", self._status())

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=shutting down")

    def moved(self, name: str, state: State, reason: str) -> None:
        self._engines[name] = f"{state.value} ({reason})"
        self.send(self._status())

    def _status(self) -> str:
        if len(self._engines) == 1:
            return f"STATUS=engine {next(iter(self._engines.values()))}"
        return "STATUS=engines " + ", ".join(f"{name} {state}" for name, state in self._engines.items())

    async def keep_watchdog_fed(self) -> None:
        """Ping from the event loop: if the loop hangs, the pings stop and systemd restarts us."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class _EngineStatus(Observer):
    def __init__(self, notifier: SystemdNotifier, name: str):
        self._notifier, self._name = notifier, name

    def transition(self, old: State, new: State, reason: str, seconds: float) -> None:
        self._notifier.moved(self._name, new, reason)
