"""The command line: ``autosleepd`` (serve), ``autosleepd sim``, ``autosleepd demo``."""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time

import aiohttp

from . import __version__, control, log
from .config import Config, ConfigError, parse_duration
from .server import Autosleepd
from .sim import SimSettings, SimulatedEngine


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.command or "serve"
    if command == "sim":
        return _run_sim(args)
    if command in ("status", "sleep", "wake"):
        return control.run(command, args, os.environ)
    try:
        config = Config.from_env(os.environ)
        if command == "demo":
            config = _demo_config(os.environ, config)
    except ConfigError as error:
        print(f"autosleepd: {error}", file=sys.stderr)
        return 2
    log.configure(config.log_level, config.log_format)
    with asyncio.Runner(loop_factory=_loop_factory(config.event_loop)) as runner:
        if command == "demo":
            return runner.run(_demo(config, tour=not args.no_tour))
        return runner.run(_serve(config))


def _loop_factory(choice: str):
    """uvloop when asked for, or when installed and not declined (see bench/ for what it buys)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autosleepd",
        description="Reverse-proxy sidecar that puts an idle vLLM server to sleep and wakes it "
                    "on demand. Configured through AUTOSLEEPD_* environment variables.")
    parser.add_argument("--version", action="version", version=f"autosleepd {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the proxy (the default)")
    demo = commands.add_parser("demo", help="run the simulator with autosleepd in front of it "
                                            "and show a sleep and a wake")
    demo.add_argument("--no-tour", action="store_true", help="serve only; send no requests")
    for name, help_text in (("status", "show a running instance's state"),
                            ("sleep", "put the engine to sleep now (drains first)"),
                            ("wake", "wake the engine now")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--url", help="the instance (default: $AUTOSLEEPD_URL, else built from "
                                       "AUTOSLEEPD_HOST and AUTOSLEEPD_PORT)")
        sub.add_argument("--json", action="store_true", help="print the raw JSON status")
        if name == "sleep":
            sub.add_argument("--level", type=int, choices=(1, 2),
                             help="sleep level (default: the instance's AUTOSLEEPD_SLEEP_LEVEL)")
    sim = commands.add_parser("sim", help="run the vLLM simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)
    sim.add_argument("--model", default="sim-model")
    for name, help_text in (("load", "time to load before listening"),
                            ("sleep", "duration of a /sleep call"),
                            ("wake", "duration of a /wake_up call"),
                            ("reload", "duration of reload_weights"),
                            ("token", "time between generated tokens")):
        sim.add_argument(f"--{name}", type=_duration_arg, default=0.0, help=help_text)
    sim.add_argument("--asleep", choices=("hang", "crash"), default="hang",
                     help="what a request to a sleeping engine gets (v0.17+: hang; v0.11: crash)")
    sim.add_argument("--no-dev-mode", action="store_true", help="as without VLLM_SERVER_DEV_MODE=1")
    sim.add_argument("--no-sleep-mode", action="store_true", help="as without --enable-sleep-mode")
    sim.add_argument("--dummy-weights", action="store_true", help="as with --load-format dummy")
    return parser


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 0.5, 250ms or 2s") from None


def _raise_open_files_limit() -> None:
    """Every client and every upstream request holds a descriptor: take what the host allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def _serve(config: Config) -> int:
    _raise_open_files_limit()
    server = Autosleepd(config)
    try:
        await server.start()
    except OSError as error:
        print(f"autosleepd: cannot listen on {config.host}:{config.port} "
              f"(AUTOSLEEPD_HOST/AUTOSLEEPD_PORT): {error.strerror or error}", file=sys.stderr)
        return 1
    return await server.serve_forever()


def _run_sim(args: argparse.Namespace) -> int:
    settings = SimSettings(model=args.model, load_seconds=args.load, sleep_seconds=args.sleep,
                           wake_seconds=args.wake, reload_seconds=args.reload,
                           token_seconds=args.token, asleep_behaviour=args.asleep,
                           dev_mode=not args.no_dev_mode, sleep_mode=not args.no_sleep_mode,
                           dummy_weights=args.dummy_weights)

    async def run() -> int:
        try:
            sim = SimulatedEngine(settings, args.host, args.port)
        except OSError as error:
            print(f"autosleepd sim: cannot listen on {args.host}:{args.port}: {error.strerror}",
                  file=sys.stderr)
            return 1
        await sim.start()
        print(f"vLLM simulator listening on {sim.url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await sim.close()
        return 0

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0


def _demo_config(env, config: Config) -> Config:
    """The demo's defaults: a short idle window; the upstream is the built-in simulator."""
    from dataclasses import replace
    idle = config.idle_timeout if "AUTOSLEEPD_IDLE_TIMEOUT" in env else 5.0
    return replace(config, idle_timeout=idle, host=env.get("AUTOSLEEPD_HOST", "127.0.0.1"))


async def _demo(config: Config, tour: bool) -> int:
    from dataclasses import replace
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
