"""Makes docs/live-page.png: three simulated engines behind one autosleepd port after a simulated
day of traffic (a manual clock runs the day in seconds), shown by the live page in headless
Chromium.   .venv/bin/python docs/live_page_screenshot.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autosleepd import log  # noqa: E402
from autosleepd.clock import ManualClock  # noqa: E402
from autosleepd.config import Config  # noqa: E402
from autosleepd.server import Autosleepd  # noqa: E402
from autosleepd.sim import SimSettings, SimulatedEngine  # noqa: E402
from autosleepd.sim.gpu import GiB, SimGpu, SimProcesses  # noqa: E402
from tests.browser import Browser  # noqa: E402

ENGINES = (("qwen3-8b", "Qwen/Qwen3-8B", 48), ("qwen3-0.6b", "Qwen/Qwen3-0.6B", 40),
           ("bge-m3", "BAAI/bge-m3", 6))
STEP = 600.0   # the simulated day advances ten minutes at a time


def used(name: str, minute_of_day: int) -> bool:
    """Who gets traffic when: office hours for the big model, bursts for the small, a batch job."""
    hour = minute_of_day // 60
    if name == "qwen3-8b":
        return 9 <= hour < 12 or 14 <= hour < 18 and minute_of_day % 40 == 0
    if name == "qwen3-0.6b":
        return hour in (7, 13, 20, 21) and minute_of_day % 20 == 0
    return minute_of_day % 240 == 0


async def main() -> int:
    log.configure("warning", "console")
    gpu, processes = SimGpu(total=141 * GiB), SimProcesses()
    sims = []
    for _, model, awake in ENGINES:
        sim = SimulatedEngine(SimSettings(model=model, awake_bytes=awake * GiB, asleep_bytes=GiB,
                                          weights_bytes=awake * GiB // 2), gpu=gpu)
        await sim.start()
        processes.add(sim)
        sims.append(sim)
    start = time.time() - 24 * 3600
    clock = ManualClock(wall_start=start - start % STEP)
    config = dataclasses.replace(Config(), host="127.0.0.1", port=0, idle_timeout=900.0,
                                 engines=tuple((n, s.url) for (n, _, _), s in zip(ENGINES, sims)),
                                 upstream=sims[0].url)
    server = Autosleepd(config, clock=clock, gpu=gpu, processes=processes)
    await server.start()
    browser = None
    try:
        async with aiohttp.ClientSession() as http:
            while clock.wall() < time.time() - STEP:
                minute = int(clock.wall() % 86400 // 60)
                for name, model, _ in ENGINES:
                    if used(name, minute):
                        async with http.post(server.url + "/v1/completions",
                                             json={"model": model, "prompt": "hi", "max_tokens": 2}) as response:
                            assert response.status == 200, await response.text()
                clock.advance(STEP)
                await asyncio.sleep(0.02)   # the control loops act on what fell due
            server.host.by_name["qwen3-8b"].supervisor.pin(2 * 3600)
            await asyncio.sleep(0.2)
        browser = await Browser.start(width=1280, height=860)
        if browser is None:
            print("chromium is not installed", file=sys.stderr)
            return 1
        await browser.open(server.url + "/autosleepd/")
        await browser.wait_for("document.querySelectorAll('#timeline .row').length === 3")
        await asyncio.sleep(0.3)   # the fonts settle
        target = ROOT / "docs" / "live-page.png"
        await browser.screenshot(target)
        print(f"wrote {target}")
        return 0
    finally:
        if browser is not None:
            await browser.close()
        await server.shutdown()
        for sim in sims:
            await sim.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
