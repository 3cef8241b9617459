"""Admission shared between the owner and its worker processes: one segment per supervisor.

The segment is a memfd mapped by every process of one engine (created by the owner, inherited by
the workers), laid out in 64-byte lines so no two writers share a cache line:

    line 0        the admission flag: 0 open, 1 closed (written by the owner only)
    line 1 + i    worker i: requests in flight, last activity (monotonic ns) (written by worker i)

The race it must win: the owner decides to sleep, closes admission and waits for in-flight work
to drain; a worker admitting a request at that moment must either be counted before the owner
reads its count, or see the flag closed and hold the request. That is Dekker's pattern (write
mine, then read theirs, on both sides), and it needs a full fence between the write and the read
in both processes. CPython gives no atomics or fences on shared memory (the ``atomics`` package
does, through cffi, at 5-7 us an operation here, ten times what it protects against), so each
worker's line is guarded by a POSIX record lock on its own byte of the memfd (``fcntl.lockf``):
the worker takes it around "count + 1, read the flag", the owner takes each worker's lock in turn
after writing the flag, around reading the count. The lock is mutual exclusion (so correctness
needs no reasoning about memory order at all: the kernel's lock is the fence) and is uncontended
(each worker has its own; the owner takes them only when it closes): admitting and releasing a
request cost 1.1 us together, measured.
The kernel drops a record lock when its process dies, so a worker killed inside the two lines
cannot leave the owner waiting for ever, which a semaphore (multiprocessing.Lock, 0.1 us) would.

A worker's release is a plain store of its own count (it has the only writer): seen late, it only
makes a drain wait a little longer. The owner resets a worker's line once that worker has exited.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time

LINE = 64
_WORD = struct.Struct("=q")
_SLOT = struct.Struct("=qq")   # in flight, last activity (time.monotonic_ns)
OPEN, CLOSED = 0, 1


class SharedAdmission:
    """The owner's and the workers' view of one engine's segment."""

    def __init__(self, fd: int, slots: int):
        self.fd = fd
        self.slots = slots
        self._map = mmap.mmap(fd, LINE * (slots + 1))

    @classmethod
    def create(cls, slots: int) -> "SharedAdmission":
        """The owner's: a fresh segment, admission closed until the owner opens it."""
        fd = os.memfd_create("autosleepd-admission", 0)   # inheritable only where passed
        os.ftruncate(fd, LINE * (slots + 1))
        shared = cls(fd, slots)
        _WORD.pack_into(shared._map, 0, CLOSED)
        return shared

    def close_segment(self) -> None:
        self._map.close()
        os.close(self.fd)

    # ----- a worker (slot = its index) ---------------------------------------------------------

    def enter(self, slot: int) -> bool:
        """Count one request in flight if admission is open; False (nothing counted) if closed."""
        offset = LINE * (slot + 1)
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, offset)
        try:
            count = _WORD.unpack_from(self._map, offset)[0]
            if _WORD.unpack_from(self._map, 0)[0] != OPEN:
                return False
            _WORD.pack_into(self._map, offset, count + 1)
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)

    def leave(self, slot: int) -> None:
        offset = LINE * (slot + 1)
        count = _WORD.unpack_from(self._map, offset)[0]
        _SLOT.pack_into(self._map, offset, count - 1, time.monotonic_ns())

    # ----- the owner ---------------------------------------------------------------------------

    def set_open(self, admitting: bool) -> None:
        """Open or close admission. Closing returns once no worker can still admit on the
        strength of the open flag: every worker's lock is taken once after the flag is written."""
        if admitting:
            _WORD.pack_into(self._map, 0, OPEN)
            return
        if _WORD.unpack_from(self._map, 0)[0] == CLOSED:
            return
        _WORD.pack_into(self._map, 0, CLOSED)
        for slot in range(self.slots):
            offset = LINE * (slot + 1)
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, offset)
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)

    @property
    def open(self) -> bool:
        return _WORD.unpack_from(self._map, 0)[0] == OPEN

    def counted(self, slot: int) -> int:
        """Requests worker ``slot`` has in flight."""
        return _WORD.unpack_from(self._map, LINE * (slot + 1))[0]

    def in_flight(self) -> int:
        return sum(self.counted(slot) for slot in range(self.slots))

    def last_activity(self) -> float:
        """The latest end of work in any worker, in ``time.monotonic()`` seconds (0 if none)."""
        return max(_SLOT.unpack_from(self._map, LINE * (slot + 1))[1]
                   for slot in range(self.slots)) / 1e9

    def reset(self, slot: int) -> None:
        """A worker has exited: whatever it counted in flight is gone with it."""
        offset = LINE * (slot + 1)
        _WORD.pack_into(self._map, offset, 0)
