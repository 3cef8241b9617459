#!/usr/bin/env python3
"""Memory of held requests: 1,024 requests with 1 MiB bodies sent into a sleeping engine.

autosleepd holds them all while the engine wakes (the simulator's wake is made slow enough for
every one of them to be held at once), then serves them after one wake. Printed and written to
bench/results/held_bodies.json: autosleepd's RSS before, while all are held, its peak (VmHWM)
and after they are served. The Kubernetes memory limit in deploy/kubernetes/ follows from the
peak. Targets: peak under 160 MiB, after under 100 MiB.

    make bench            (or: .venv/bin/python bench/held_bodies.py [--workers N])
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import RESULTS, Services, start_autosleepd, start_sim  # noqa: E402

from autosleepd.sim import expected_text  # noqa: E402

REQUESTS = 1024
BODY_BYTES = 2**20
PADDING = b"x" * BODY_BYTES   # one word: the answer's two tokens stay "held", "<i>"


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def body(i: int) -> tuple[int, object]:
    head = b'{"model": "sim-model", "max_tokens": 2, "prompt": "held %d ' % i
    tail = b'"}'

    async def chunks():
        yield head
        for start in range(0, BODY_BYTES, 64 * 1024):
            yield PADDING[start:start + 64 * 1024]
        yield tail

    return len(head) + BODY_BYTES + len(tail), chunks()


async def measure(services: Services, workers: int) -> dict:
    sim = start_sim(services, "--wake", "8s")
    proxy, pid = start_autosleepd(services, sim, "auto", workers=workers)
    processes = [psutil.Process(pid), *psutil.Process(pid).children()]
    mib = lambda n: round(n / 2**20, 1)   # noqa: E731

    def rss() -> list[float]:   # per process, the owner first
        return [mib(process.memory_info().rss) for process in processes]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def status() -> dict:
            async with http.get(proxy + "/autosleepd/status") as response:
                return await response.json()

        async def one(i: int) -> bool:
            length, data = body(i)
            async with http.post(proxy + "/v1/completions", data=data,
                                 headers={"Content-Type": "application/json",
                                          "Content-Length": str(length)}) as response:
                answer = await response.json()
            return (response.status == 200
                    and answer["choices"][0]["text"] == expected_text(f"held {i} x", 2))

        while (await status())["state"] != "awake":
            await asyncio.sleep(0.05)
        async with http.post(proxy + "/autosleepd/sleep") as response:
            assert response.status == 200
        before = rss()
        started = time.monotonic()
        requests = asyncio.gather(*(one(i) for i in range(REQUESTS)))
        while (await status())["queued"] < REQUESTS:
            await asyncio.sleep(0.05)
        held = rss()
        correct = sum(await requests)
        served_in = time.monotonic() - started
        await asyncio.sleep(3)   # what stays once the answers have gone out (and a heap trim)
        after = rss()
        wakes = (await status())["wakes"]
        peaks = [mib(peak_rss(process.pid)) for process in processes]
    return {"requests": REQUESTS, "body_mib": mib(BODY_BYTES), "answered_correctly": correct,
            "wakes": wakes, "processes": workers, "rss_before_mib": round(sum(before), 1),
            "rss_all_held_mib": round(sum(held), 1), "rss_peak_mib": round(sum(peaks), 1),
            "rss_after_served_mib": round(sum(after), 1), "seconds_to_serve_all": round(served_in, 2),
            # the targets hold per process (each has its own memory limit in a container)
            "largest_peak_mib": max(peaks), "largest_after_served_mib": max(after),
            **({"per_process_mib": {"before": before, "all_held": held, "after_served": after,
                                    "peak": peaks}} if workers > 1 else {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1,
                        help="AUTOSLEEPD_WORKERS; above 1 the figures are summed over the processes "
                             "and written to held_bodies-workers.json")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    with tempfile.TemporaryDirectory() as workdir:
        services = Services(Path(workdir))
        try:
            result = asyncio.run(measure(services, args.workers))
        finally:
            services.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "held_bodies.json" if args.workers == 1 else "held_bodies-workers.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"held bodies: {result}")
    ok = (result["answered_correctly"] == REQUESTS and result["wakes"] == 1
          and result["largest_peak_mib"] < 160 and result["largest_after_served_mib"] < 100)
    print("held bodies: " + ("within target" if ok else "MISSED the target "
                             "(all correct, one wake, peak < 160 MiB, after < 100 MiB, per process)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
