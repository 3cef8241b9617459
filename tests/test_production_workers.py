"""Production questions asked of worker mode (found by review): what happens to autosleepd's
processes when the world around them misbehaves. Real processes, real sockets, the simulator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading

import aiohttp
import psutil
import pytest

from autosleepd import log

from .conftest import completion, eventually
from .test_reliability import sim_process  # noqa: F401 (a fixture)


@pytest.mark.parametrize("workers", ["1", "4"])
async def test_a_log_reader_that_stops_reading_never_stops_the_proxy(sim_process, start_daemon,  # noqa: F811
                                                                     workers):
    """A stuck journald, a paused pager, Ctrl-S on a terminal: the pipe of the log fills. Every
    process must go on serving (lines are dropped, not waited for), and SIGTERM still ends it."""
    sim = await sim_process()
    daemon = await start_daemon(sim.url, AUTOSLEEPD_WORKERS=workers, AUTOSLEEPD_LOG_REQUESTS="true")
    processes = [psutil.Process(daemon.process.pid), *psutil.Process(daemon.process.pid).children()]
    stderr = daemon.process._transport.get_pipe_transport(2)
    stderr.pause_reading()   # the reader stops reading
    try:
        await serve_and_stop(daemon, processes)
    finally:
        stderr.resume_reading()   # (asyncio's wait() waits for the end of the pipe too)
    assert await asyncio.wait_for(daemon.process.wait(), 15) == 0


async def serve_and_stop(daemon, processes: list[psutil.Process]) -> None:
    served = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:

        async def one(i: int) -> int:
            async with http.post(daemon.url + "/v1/completions", json=completion(f"r{i}", 1)) as r:
                return r.status

        # ~250 bytes of log a request: 1,500 fill the 64 KiB pipe five times over.
        for burst in range(30):
            statuses = await asyncio.wait_for(
                asyncio.gather(*(one(50 * burst + i) for i in range(50))), 20)
            served += statuses.count(200)
    assert served == 1500
    daemon.process.send_signal(signal.SIGTERM)   # the reader still reads nothing
    await eventually(lambda: all(exited(process) for process in processes), timeout=15,
                     what="every process exited")


def exited(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_lines_a_stalled_reader_missed_are_counted_once_it_reads_again():
    read_end, write_end = os.pipe()
    stream = log._Survivable(os.fdopen(write_end, "w"))
    total = log.PENDING_LINES + 2000   # the pipe holds ~650 of these, the queue PENDING_LINES
    for i in range(total):   # nobody reads yet
        stream.write(f"line {i:06d} {'.' * 88}")
        stream.write("\n")   # as print() sends it: apart
    received = bytearray()

    def read() -> None:   # the reader comes back
        while chunk := os.read(read_end, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stream.drain(timeout=10)   # what was kept is written
    stream.write("after\n")
    stream.drain(timeout=10)
    os.close(write_end)
    reader.join(timeout=10)
    lines = received.decode().splitlines()
    notices = [json.loads(line) for line in lines if "log_lines_dropped" in line]
    kept = [line for line in lines if line.startswith("line ")]
    dropped = sum(notice["count"] for notice in notices)   # said as soon as the reader takes lines
    assert notices and dropped > 0
    assert len(kept) + dropped == total, "every line is either written or counted"
    assert kept == sorted(kept) and lines[-1] == "after"
