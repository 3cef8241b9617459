"""The worker's side: the gate the relay calls instead of the supervisor, and its link.

The gate is the relay's ``Gate`` (proxy/relay.py) in a worker, in the supervisor's place:
``try_admit()``, ``admit(until)``, ``release()``, ``stalled()``, ``engine_unreachable(detail)``,
``now()`` and ``keep_alive(seconds)``. Admission takes the shared segment's
fast path (no message); a request that finds it closed is held by the owner: a ``hold`` message
out, ``admitted`` or ``refused`` back. Work the owner admitted is counted in the owner's own
admission, so its release goes back as a ``release`` message; counts are interchangeable, so any
release pays back such a debt first.

Messages are JSON lines on a Unix stream socket pair, one per worker; on a host of several
engines a worker has a gate per engine (each with that engine's segment), and every message
about work names its engine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import structlog

from ..control.interfaces import Refused
from .shared import SharedAdmission

STALL_GAP = 1.0   # seconds: a stall is reported at most this often (the owner probes at most so)


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class WorkerGate:
    """One engine's gate in a worker (``engine``: its index in the host, named in every message)."""

    def __init__(self, shared: SharedAdmission, slot: int, writer: asyncio.StreamWriter,
                 engine: int = 0, observer=None):
        self._shared, self._slot, self._writer, self.engine = shared, slot, writer, engine
        self._observer = observer   # told of each held request let through: .released(seconds)
        self._ids = itertools.count()
        self._held: dict[int, asyncio.Future] = {}
        self.owed = 0              # admitted by the owner, not yet released
        self.in_flight = 0         # admitted either way, not yet released
        self._last_stall = -STALL_GAP
        self._owner_gone = False   # then nothing new is admitted: no one is left to count it
        self._log = structlog.get_logger("autosleepd.worker")

    def now(self) -> float:
        return time.monotonic()

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self._held

    def try_admit(self) -> bool:
        """Admitted now (counted in this worker's line) if the owner's flag is open; no message."""
        if not self._owner_gone and self._shared.enter(self._slot):
            self.in_flight += 1
            return True
        return False

    async def admit(self, until: float | None = None) -> None:
        """Return once admitted; raise ``Refused``. The slow path asks the owner."""
        if self.try_admit():
            return
        if self._owner_gone:
            raise Refused("shutting_down", "autosleepd is shutting down")
        number = next(self._ids)
        loop = asyncio.get_running_loop()
        future = self._held[number] = loop.create_future()
        since = loop.time()
        self._tell({"op": "hold", "id": number,
                    "wait": None if until is None else max(0.0, until - self.now())})
        try:
            await future
        except asyncio.CancelledError:
            if self._held.pop(number, None) is not None:
                self._tell({"op": "cancel", "id": number})
            elif future.done() and not future.cancelled() and future.exception() is None:
                self._tell({"op": "release"})   # admitted, then cancelled before it could run
            raise
        self.owed += 1
        self.in_flight += 1
        if self._observer is not None:
            self._observer.released(loop.time() - since)

    def release(self) -> None:
        self.in_flight -= 1
        if self.owed:
            self.owed -= 1
            self._tell({"op": "release"})
        else:
            self._shared.leave(self._slot)

    def stalled(self) -> None:
        now = self.now()
        if now - self._last_stall >= STALL_GAP:
            self._last_stall = now
            self._tell({"op": "stalled"})

    def engine_unreachable(self, detail: str) -> None:
        self._tell({"op": "unreachable", "detail": detail})

    def keep_alive(self, seconds: float) -> None:
        self._tell({"op": "keep_alive", "seconds": seconds})

    # ----- the owner's answers ------------------------------------------------------------------

    def answer(self, message: dict) -> None:
        future = self._held.pop(message["id"], None)
        if future is None or future.done():
            if message["op"] == "admitted":
                self._tell({"op": "release"})   # its client went away while the owner admitted it
            return
        if message["op"] == "admitted":
            future.set_result(None)
        else:
            future.set_exception(Refused(message["reason"], message["message"],
                                         message.get("retry_after")))

    def owner_gone(self) -> None:
        """The owner's link broke: nothing held can be let through any more, nor anything new."""
        self._owner_gone = True
        for future in self._held.values():
            if not future.done():
                future.set_exception(Refused("shutting_down", "autosleepd is shutting down"))
        self._held.clear()

    def _tell(self, message: dict) -> None:
        """A message about this engine's work."""
        self.send({**message, "engine": self.engine})

    def send(self, message: dict) -> None:
        if not self._writer.is_closing():
            self._writer.write(encode(message))
