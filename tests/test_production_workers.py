"""Production questions asked of worker mode (found by review): what happens to autosleepd's
processes when the world around them misbehaves. Real processes, real sockets, the simulator."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import select
import signal
import socket
import struct
import termios
import threading
import time

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
    assert await asyncio.wait_for(daemon.read_log_until_exit(), 15) == 0
    logged = sum(line["event"] == "request" for line in daemon.lines)
    assert logged < 1500, "the reader's stall never filled the pipe: nothing was tested"


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


async def test_a_worker_whose_owner_was_killed_takes_no_new_work(sim_process, start_daemon):  # noqa: F811
    """The owner is SIGKILLed while a worker streams: the worker lets that stream finish, but a
    new request on another of its kept-alive connections gets a 503, not the engine: nobody is
    left to sleep or wake it, nor to count that work."""
    sim = await sim_process("--token", "50ms")
    daemon = await start_daemon(sim.url, AUTOSLEEPD_WORKERS="4")
    owner = psutil.Process(daemon.process.pid)
    workers = owner.children()
    clients = []
    by_worker: dict[int, list[socket.socket]] = {}
    while not any(len(held) >= 2 for held in by_worker.values()):   # two connections on a worker
        assert len(clients) < 200, "no worker accepted two connections"
        client = socket.create_connection(("127.0.0.1", daemon.port))
        clients.append(client)
        client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(65536).startswith(b"HTTP/1.1 200")   # accepted and served
        port = client.getsockname()[1]
        server = next((w for w in workers if any(c.raddr and c.raddr.port == port
                                                 for c in w.net_connections("tcp"))), None)
        if server is not None:
            by_worker.setdefault(server.pid, []).append(client)
    pid, (streaming, later) = next((pid, held) for pid, held in by_worker.items() if len(held) >= 2)
    body = json.dumps(completion("long", 100, stream=True)).encode()   # 5 s
    streaming.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                      b"\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    assert streaming.recv(65536).startswith(b"HTTP/1.1 200")   # under way
    owner.kill()
    worker = psutil.Process(pid)
    await eventually(lambda: not any(c.status == psutil.CONN_LISTEN
                                     for c in worker.net_connections("tcp")),
                     what="the worker saw its owner go")
    body = json.dumps(completion("no owner")).encode()
    later.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    later.settimeout(10)
    answer = later.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503") and b"shutting_down" in answer, answer[:200]
    streamed = b""
    streaming.settimeout(20)
    while not streamed.endswith(b"0\r\n\r\n"):   # the stream in flight ends whole
        chunk = streaming.recv(65536)
        assert chunk, "the stream was cut"
        streamed += chunk
    assert b"data: [DONE]" in streamed
    for client in clients:
        client.close()
    gone, alive = await asyncio.to_thread(psutil.wait_procs, workers, timeout=15)
    assert not alive, "workers outlived their owner"
    assert await asyncio.wait_for(daemon.process.wait(), 15) == -signal.SIGKILL


F_GETPIPE_SZ = 1032   # fcntl's, on Linux


def pending(fd: int) -> int:
    """Bytes waiting in a pipe."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def test_a_log_descriptor_left_non_blocking_still_gets_every_line_kept():
    """Whoever started autosleepd may have left its stderr non-blocking: a full pipe then
    answers EAGAIN, which must mean 'wait for room', not the end of the log."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    stream = log._Survivable(os.fdopen(write_end, "w"))
    for i in range(1000):   # more than the pipe holds: the writer meets EAGAIN
        stream.write(f"line {i:06d} {'.' * 88}\n")
    capacity = fcntl.fcntl(read_end, F_GETPIPE_SZ)
    deadline = time.monotonic() + 10
    while pending(read_end) < capacity - select.PIPE_BUF:   # full before anyone reads
        assert time.monotonic() < deadline, "the writer never filled the pipe"
        select.select([], [], [], 0.01)
    received = bytearray()

    def read() -> None:
        while chunk := os.read(read_end, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stream.write("after\n")
    stream.drain(timeout=10)
    os.close(write_end)
    reader.join(timeout=10)
    lines = received.decode().splitlines()
    assert lines == [f"line {i:06d} {'.' * 88}" for i in range(1000)] + ["after"]


def test_a_full_disk_costs_the_log_lines_not_the_log_for_good():
    """A log file on a full disk (ENOSPC), or a hung-up terminal (EIO): the lines written then
    are lost, and the lines after room comes back go out."""
    full = os.open("/dev/full", os.O_WRONLY)
    stream = log._Survivable(os.fdopen(full, "w"))
    stream.write("lost to a full disk\n")
    stream.drain(timeout=10)
    read_end, write_end = os.pipe()
    os.dup2(write_end, full)   # room again: the same descriptor now leads somewhere
    os.close(write_end)
    stream.write("after\n")
    stream.drain(timeout=10)
    os.close(full)
    with os.fdopen(read_end) as pipe:
        assert pipe.read().splitlines() == ["after"]
