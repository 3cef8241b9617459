"""``autosleepd status|sleep|wake|ps|pin|unpin``: talk to a running instance, print a summary, exit non-zero
on failure. URL and token come from the same environment as the daemon's."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from datetime import datetime
from typing import Mapping
from urllib.parse import quote

from ..config import Config, ConfigError, local_url

_TIMEOUT = 600.0   # a manual sleep drains and a level-2 wake reloads: both may take minutes


def instance_url(args_url: str | None, env: Mapping[str, str]) -> str:
    if args_url:
        return args_url.rstrip("/")
    if env.get("AUTOSLEEPD_URL"):
        return env["AUTOSLEEPD_URL"].rstrip("/")
    config = Config.from_env(env)
    return local_url(config.host, config.port)


def run(command: str, args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        url = instance_url(args.url, env)
    except ConfigError as error:
        print(f"autosleepd {command}: {error}", file=sys.stderr)
        return 2
    named = f"model={quote(args.model, safe='')}" if getattr(args, "model", None) else ""
    if command == "status":
        request = urllib.request.Request(url + "/autosleepd/status" + (f"?{named}" if named else ""))
    elif command == "ps":
        request = urllib.request.Request(url + "/autosleepd/host")
    elif command in ("pin", "unpin"):
        order = {"model": args.model}
        if command == "pin" and args.duration is not None:
            order["duration"] = args.duration
        request = _order(f"{url}/autosleepd/{command}", env, json.dumps(order).encode())
    else:
        query = "&".join(q for q in (f"level={args.level}" if command == "sleep" and args.level
                                     else "", named) if q)
        request = _order(f"{url}/autosleepd/{command}" + (f"?{query}" if query else ""), env, b"")
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            status = json.load(response)
    except urllib.error.HTTPError as error:
        print(f"autosleepd {command}: {url} answered {error.code}: {_message(error)}",
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        print(f"autosleepd {command}: cannot reach autosleepd at {url}: {reason}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    elif command == "ps":
        print(table(status))
    elif command in ("pin", "unpin"):
        pin = status["pin"]
        print(f"{status['name']}: {pin['text'] if pin else 'not pinned'} ({status['state']})")
    else:
        print(summary(status))
    return 0


def _order(url: str, env: Mapping[str, str], body: bytes) -> urllib.request.Request:
    """A POST with the admin token, when there is one."""
    request = urllib.request.Request(url, method="POST", data=body,
                                     headers={"Content-Type": "application/json"})
    token = env.get("AUTOSLEEPD_ADMIN_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    return request


def _message(error: urllib.error.HTTPError) -> str:
    try:
        return json.load(error)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return error.reason


def summary(status: dict) -> str:
    def secs(value) -> str:
        return "-" if value is None else f"{value:g}s"

    level = f", level {status['sleep_level']}" if status["state"] == "asleep" else ""
    autosleep = (f"sleeps after {secs(status['idle_timeout_seconds'])} idle"
                 if status["autosleep"] else "autosleep off")
    if not status["sleep_supported"]:
        autosleep = "the engine cannot sleep (see last error)"
    lines = [
        f"state:      {status['state']} for {secs(status['state_seconds'])}{level}",
        f"engine:     {status['upstream']}; {autosleep}",
        f"activity:   {status['in_flight']} in flight, {status['queued']} held, "
        f"idle {secs(status['idle_seconds'])}",
        f"sleeps:     {status['sleeps']} (last took {secs(status['last_sleep_seconds'])}, "
        f"{status['sleep_failures']} failed)",
        f"wakes:      {status['wakes']} (last took {secs(status['last_wake_seconds'])}, "
        f"{status['wake_failures']} failed)",
    ]
    if status.get("stops") or status.get("starts") or status.get("start_failures"):
        lines.append(f"stops:      {status['stops']} (last took {secs(status['last_stop_seconds'])}, "
                     f"{status['stop_failures']} failed); starts: {status['starts']} (last took "
                     f"{secs(status['last_start_seconds'])}, {status['start_failures']} failed)")
    if status.get("start_failure"):
        lines.append(f"start failed: {status['start_failure']}")
    auto = status.get("sleep_level_auto")
    if auto and auto.get("last_choice"):
        chosen = auto["last_choice"]
        lines.append(f"auto level: {chosen['level'] or 'no sleep'} ({chosen['reason']})")
    power = status.get("power")
    if power and power.get("watts") is not None:
        idle = power["awake_idle_watts"]
        lines.append(f"power:      {power['watts']:g} W now (awake idle: "
                     f"{'not measured yet' if idle is None else f'{idle:g} W'}); saved "
                     f"{power['saved_wh']:g} Wh against staying awake")
    if status.get("next_transition"):
        upcoming = status["next_transition"]
        when = "" if upcoming["in_seconds"] is None else f", at {upcoming['at']} (in {upcoming['in_seconds']:g}s)"
        lines.append(f"next:       {upcoming['what']}{when}")
    if status.get("gpu_memory_freed_bytes") is not None:
        lines.append(f"last sleep freed {status['gpu_memory_freed_bytes'] / 2**30:.2f} GiB of GPU memory")
    if status.get("last_error"):
        lines.append(f"last error: {status['last_error']}")
    return "\n".join(lines)


def table(host: dict) -> str:
    """``autosleepd ps``: one line per engine, like ``ollama ps``."""
    now = datetime.fromisoformat(host["now"])
    rows = [("ENGINE", "MODELS", "STATE", "LEVEL", "AWAKE", "ASLEEP", "LAST USED", "HELD", "NEXT", "PIN")]
    for engine in host["engines"]:
        upcoming = engine["next_transition"]
        pin = engine["pin"]
        rows.append((
            engine["name"], ",".join(engine["models"]), engine["state"],
            "-" if engine["sleep_level"] is None else str(engine["sleep_level"]),
            _gib(engine["gpu_memory_awake_bytes"]), _gib(engine["gpu_memory_asleep_bytes"]),
            _ago(now, datetime.fromisoformat(engine["last_used"])),
            str(engine["held"]),
            "-" if upcoming is None else upcoming["what"] + (
                "" if upcoming["in_seconds"] is None else f" (in {_span(upcoming['in_seconds'])})"),
            "-" if pin is None else ("until unpinned" if pin["in_seconds"] is None
                                     else f"{_span(pin['in_seconds'])} left"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)


def _gib(amount: int | None) -> str:
    return "-" if amount is None else f"{amount / 2**30:.1f} GiB"


def _span(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _ago(now: datetime, then: datetime) -> str:
    return f"{_span(max(0.0, (now - then).total_seconds()))} ago"
