"""Giving memory back after a burst: glibc keeps freed heap pages, so after a large held queue
has been released and served, autosleepd's RSS would stay at its peak. A trim after each large
release (debounced, off the hot path) returns them to the system."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

from typing import Callable

from .control.interfaces import Observer

LARGE_RELEASE = 64   # held requests let through before a trim is worth it
CHECK_EVERY = 1.0    # then, this often: trim once nothing is in flight (their bodies are gone)


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):   # not glibc: nothing to trim
        return None


class HeapTrimmer(Observer):
    def __init__(self, idle: Callable[[], bool]):
        self._idle = idle
        self._trim = _malloc_trim()
        self._released = 0
        self._timer: asyncio.TimerHandle | None = None

    def released(self, held_seconds: float) -> None:
        self._released += 1
        if self._trim is not None and self._released >= LARGE_RELEASE and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(CHECK_EVERY, self._check)

    def _check(self) -> None:
        if not self._idle():
            self._timer = asyncio.get_running_loop().call_later(CHECK_EVERY, self._check)
            return
        self._released, self._timer = 0, None
        self._trim(0)
