"""What the supervisor talks through: the engine it drives, the observers it tells, and the
errors it answers with. No behaviour here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from .states import State


class Engine(Protocol):
    async def is_sleeping(self, timeout: float = ...) -> bool: ...
    async def sleep_level(self, timeout: float = ...) -> int | None: ...
    async def sleep(self, level: int, timeout: float) -> None: ...
    async def wake(self, level: int, timeout: float, on_step=None) -> None: ...
    async def check_inference(self, timeout: float) -> None: ...
    async def fingerprint(self, timeout: float) -> tuple: ...


Restarter = Callable[[], Awaitable[bool]]   # runs the restart command; True if it succeeded


class Observer:
    """What the supervisor reports as it goes; each observer overrides what it needs."""

    def transition(self, old: State, new: State, reason: str, seconds: float) -> None: ...
    def slept(self, level: int, reason: str, seconds: float) -> None: ...
    def woke(self, level: int, reason: str, seconds: float) -> None: ...
    def sleep_failed(self) -> None: ...
    def wake_failed(self) -> None: ...
    def released(self, held_seconds: float) -> None: ...
    def refused_request(self, reason: str) -> None: ...
    def held_abandoned(self) -> None: ...
    def memory_wait(self) -> None: ...
    def restarted(self, ok: bool) -> None: ...


class Refused(Exception):
    """Work that cannot be served, and why; the HTTP edge (proxy/errors.py) maps the reason."""

    REASONS = ("queue_full", "wake_timeout", "shutting_down", "engine_unavailable",
               "no_gpu_memory", "engine_broken")

    def __init__(self, reason: str, message: str, retry_after: float | None = None):
        assert reason in self.REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after   # None: the edge's default for the reason


class OrderFailed(Exception):
    """A manual sleep or wake that could not be carried out."""
