"""The admission segment shared by worker processes, attacked from several real processes.

Worker processes admit requests as fast as they can and send each admitted one to the simulator;
the owner (this test) closes admission, waits for the drain, puts the simulator to sleep and
wakes it, over and over. The simulator counts every request that reaches it asleep: none may.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp

from autosleepd.workers.shared import LINE, SharedAdmission

from .conftest import completion

WORKERS = 3
TASKS = 12        # concurrent requests per worker process


def race(fd: int, slot: int, base: str, seconds: float, counting: bool) -> None:
    """A worker process: TASKS loops of admit, send, release until ``seconds`` pass.
    ``counting=False`` is a broken gate that reads the flag without counting in flight."""
    shared = SharedAdmission(fd, WORKERS)

    async def one(http: aiohttp.ClientSession, end: float, admitted: list[int]) -> None:
        while time.monotonic() < end:
            if counting:
                if not shared.enter(slot):
                    await asyncio.sleep(0)     # held: try again
                    continue
            elif not shared.open:
                await asyncio.sleep(0)
                continue
            try:
                async with http.post(base + "/v1/completions", json=completion(max_tokens=1)) as r:
                    await r.read()
            finally:
                if counting:
                    shared.leave(slot)
            admitted[0] += 1

    async def main() -> None:
        admitted = [0]
        end = time.monotonic() + seconds
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await asyncio.gather(*(one(http, end, admitted) for _ in range(TASKS)))
        print(json.dumps({"admitted": admitted[0]}), flush=True)

    asyncio.run(main())


def start_racers(shared: SharedAdmission, base: str, seconds: float, counting: bool = True):
    code = ("import sys; from tests.test_shared_admission import race; "
            "race(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5] == '1')")
    return [subprocess.Popen([sys.executable, "-c", code, str(shared.fd), str(slot), base,
                              str(seconds), "1" if counting else "0"],
                             pass_fds=(shared.fd,), stdout=subprocess.PIPE, cwd=_ROOT)
            for slot in range(WORKERS)]


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def sleep_wake_cycles(shared: SharedAdmission, base: str, http, seconds: float) -> int:
    """The owner's side: close, drain, sleep, wake, open, as fast as it can. Returns cycles."""
    cycles, end = 0, time.monotonic() + seconds
    loop = asyncio.get_running_loop()
    while time.monotonic() < end:
        await asyncio.sleep(0.002 * (cycles % 3))   # vary the phase against the workers
        shared.set_open(False)
        deadline = loop.time() + 5
        while shared.in_flight():
            assert loop.time() < deadline, "the drain never ended"
            await asyncio.sleep(0.0005)
        async with http.post(base + "/sleep?level=1") as response:
            assert response.status == 200
        await asyncio.sleep(0.001 * (cycles % 4))
        async with http.post(base + "/wake_up") as response:
            assert response.status == 200
        shared.set_open(True)
        cycles += 1
    return cycles


async def run_race(make_sim, http, counting: bool) -> tuple[int, int, int]:
    sim = await make_sim()
    shared = SharedAdmission.create(WORKERS)
    shared.set_open(True)
    seconds = 4.0
    racers = start_racers(shared, sim.url, seconds, counting)
    try:
        cycles = await sleep_wake_cycles(shared, sim.url, http, seconds)
        outputs = await asyncio.gather(*(asyncio.to_thread(p.communicate, timeout=30) for p in racers))
    finally:
        for process in racers:
            process.kill()
        shared.close_segment()
    assert all(process.returncode == 0 for process in racers)
    admitted = sum(json.loads(out)["admitted"] for out, _ in outputs)
    return cycles, admitted, sim.stats.violations["request_while_asleep"]


async def test_no_request_reaches_the_engine_asleep_while_workers_race_the_sleep(make_sim, http):
    cycles, admitted, violations = await run_race(make_sim, http, counting=True)
    print(f"{cycles} sleep cycles, {admitted} requests admitted")
    assert cycles >= 20 and admitted >= 500, (cycles, admitted)   # the race was really run
    assert violations == 0


async def test_the_race_catches_a_gate_that_does_not_count_in_flight_work(make_sim, http):
    """The harness is not blind: the same race with a gate that only reads the flag sends
    requests to the sleeping simulator."""
    cycles, admitted, violations = await run_race(make_sim, http, counting=False)
    assert violations > 0


async def test_a_worker_killed_inside_its_admission_lock_does_not_block_the_owner():
    shared = SharedAdmission.create(WORKERS)
    shared.set_open(True)
    code = ("import fcntl, sys, time; fcntl.lockf(int(sys.argv[1]), fcntl.LOCK_EX, 1, int(sys.argv[2])); "
            "print('locked', flush=True); time.sleep(60)")   # worker 0's lock: its line's first byte
    holder = subprocess.Popen([sys.executable, "-c", code, str(shared.fd), str(LINE)], pass_fds=(shared.fd,),
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        closed = asyncio.get_running_loop().run_in_executor(None, shared.set_open, False)
        await asyncio.wait_for(closed, 5)
        assert not shared.open and not shared.enter(0)
    finally:
        holder.kill()
        shared.close_segment()
