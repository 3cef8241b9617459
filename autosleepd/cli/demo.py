"""``autosleepd sim`` and ``autosleepd demo``: the only commands that load the simulator."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from dataclasses import replace

import aiohttp

from ..config import Config
from ..server import Autosleepd
from ..sim import SimSettings, SimulatedEngine


def run_sim(args: argparse.Namespace) -> int:
    settings = SimSettings(model=args.model, load_seconds=args.load, sleep_seconds=args.sleep,
                           wake_seconds=args.wake, reload_seconds=args.reload,
                           token_seconds=args.token, asleep_behaviour=args.asleep,
                           dev_mode=not args.no_dev_mode, sleep_mode=not args.no_sleep_mode,
                           dummy_weights=args.dummy_weights, api_key=args.api_key,
                           residue_step_bytes=args.residue_step)

    async def run() -> int:
        try:
            sim = SimulatedEngine(settings, args.host, args.port)
        except OSError as error:
            print(f"autosleepd sim: cannot listen on {args.host}:{args.port}: {error.strerror}",
                  file=sys.stderr)
            return 1
        stop = asyncio.Event()   # SIGTERM (docker stop, systemctl stop) ends it cleanly, as vLLM
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await sim.start()
        print(f"vLLM simulator listening on {sim.url}", flush=True)
        try:
            await stop.wait()
        finally:
            await sim.close()
        return 0

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0


def demo_config(env, config: Config) -> Config:
    """The demo's defaults: a short idle window; the upstream is the built-in simulator."""
    idle = config.idle_timeout if "AUTOSLEEPD_IDLE_TIMEOUT" in env else 5.0
    return replace(config, idle_timeout=idle, host=env.get("AUTOSLEEPD_HOST", "127.0.0.1"))


async def demo(config: Config, tour: bool) -> int:
    sim = SimulatedEngine(SimSettings(sleep_seconds=0.3, wake_seconds=0.6, token_seconds=0.02))
    await sim.start()
    server = Autosleepd(replace(config, upstream=sim.url))
    try:
        await server.start()
    except OSError as error:
        print(f"autosleepd: cannot listen on {config.host}:{config.port} "
              f"(set AUTOSLEEPD_PORT to a free port): {error.strerror or error}", file=sys.stderr)
        await sim.close()
        return 1
    url = server.url
    print(f"\nautosleepd demo: proxy on {url}, simulated vLLM on {sim.url}, "
          f"idle window {config.idle_timeout:g}s\n"
          f"  try:  curl -s {url}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"sim-model\", \"prompt\": \"hello world\", \"max_tokens\": 8}}'\n"
          f"        curl -s {url}/autosleepd/status\n", flush=True)
    touring = asyncio.create_task(_tour(url, config.idle_timeout)) if tour else None
    try:
        return await server.serve_forever()
    finally:
        if touring:
            touring.cancel()
        await sim.close()


async def _tour(url: str, idle: float) -> None:
    """Show what autosleepd does: a request, a sleep after the idle window, a wake on demand."""
    body = {"model": "sim-model", "prompt": "hello from the demo", "max_tokens": 8}
    async with aiohttp.ClientSession() as session:
        async def complete(label: str) -> None:
            started = time.monotonic()
            async with session.post(f"{url}/v1/completions", json=body) as response:
                answer = await response.json()
            text = answer["choices"][0]["text"] if response.status == 200 else answer
            print(f"demo: {label}: {response.status} in {time.monotonic() - started:.3f}s: "
                  f"{text!r}", flush=True)

        async def state() -> str:
            async with session.get(f"{url}/autosleepd/status") as response:
                return (await response.json())["state"]

        while await state() == "starting":
            await asyncio.sleep(0.1)
        await complete("first request (engine awake)")
        print(f"demo: now idle; autosleepd puts the engine to sleep after {idle:g}s", flush=True)
        while await state() != "asleep":
            await asyncio.sleep(0.2)
        await complete("request to the sleeping engine (held, one wake, then served)")
        print("demo: the tour is over; autosleepd keeps serving until Ctrl-C", flush=True)
