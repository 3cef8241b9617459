"""The command line: ``autosleepd`` (serve), ``status|sleep|wake|ps|pin|unpin``, ``sim`` and
``demo``."""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
from typing import NoReturn

import structlog

from .. import __version__, log
from ..config import Config, ConfigError, parse_duration, parse_size, unknown_variables
from ..server import Autosleepd, StartError
from . import remote


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.command or "serve"
    if command == "sim":
        from .demo import run_sim   # the simulator is loaded only for sim and demo
        return run_sim(args)
    if command in ("status", "sleep", "wake", "ps", "pin", "unpin"):
        try:
            return remote.run(command, args, os.environ)
        except BrokenPipeError:   # `autosleepd ps | head -1`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    try:
        config = Config.from_env(os.environ)
        if command == "demo":
            from .demo import demo, demo_config
            config = demo_config(os.environ, config)
    except ConfigError as error:
        print(f"autosleepd: {error}", file=sys.stderr)
        return 2
    log.configure(config.log_level, config.log_format)
    for name, closest in unknown_variables(os.environ):
        structlog.get_logger("autosleepd").warning(
            "unknown_variable", name=name, did_you_mean=closest,
            hint="autosleepd reads no such variable; it has no effect")
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        if command == "demo":
            return runner.run(demo(config, tour=not args.no_tour))
        exit_now(runner.run(_serve(config)))


def exit_now(code: int) -> NoReturn:
    """Exit once served and stopped, without closing the event loop. Closing it waits for every
    DNS lookup still in a resolver thread, which nothing can cancel: where the engine's name
    does not resolve and no DNS server answers (Docker's DNS on a stopped engine's container,
    on a host without a reachable resolver) one lasts 10 s, and `docker stop` took that much
    longer after autosleepd had logged "stopped" (found by integration). os._exit runs no exit
    handlers, so the lines still queued for the log go out first."""
    log.drain()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # its reader gone, or closed: nothing more can be written
            pass
    os._exit(code)


def loop_factory(choice: str):
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
                            ("wake", "wake the engine now"),
                            ("ps", "show every engine of the host: models, state, memory, next step"),
                            ("pin", "keep a model's engine awake (for DURATION, else until unpinned)"),
                            ("unpin", "let a pinned model's engine sleep again")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--url", help="the instance (default: $AUTOSLEEPD_URL, else built from "
                                       "AUTOSLEEPD_HOST and AUTOSLEEPD_PORT)")
        sub.add_argument("--json", action="store_true", help="print the raw JSON answer")
        if name == "sleep":
            sub.add_argument("--level", type=int, choices=(1, 2),
                             help="sleep level (default: the instance's AUTOSLEEPD_SLEEP_LEVEL)")
        if name in ("status", "sleep", "wake"):
            sub.add_argument("--model", help="which engine, by a model it serves (or its name); "
                                             "needed where the host serves several")
        if name in ("pin", "unpin"):
            sub.add_argument("model", help="a model the engine serves (or the engine's name)")
        if name == "pin":
            sub.add_argument("duration", nargs="?", help="such as 30m or 2h (default: until unpinned)")
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
    sim.add_argument("--api-key", help="as vLLM's --api-key: /v1 paths need 'Authorization: Bearer KEY'")
    sim.add_argument("--residue-step", type=_size_arg, default=0,
                     help="GPU memory left asleep grows by this much at every sleep (e.g. 256MiB)")
    return parser


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 0.5, 250ms or 2s") from None


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4096, 256MiB or 1GiB") from None


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
    except StartError as error:
        print(f"autosleepd: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"autosleepd: cannot listen on {config.host}:{config.port} "
              f"(AUTOSLEEPD_HOST/AUTOSLEEPD_PORT): {error.strerror or error}", file=sys.stderr)
        return 1
    return await server.serve_forever()
