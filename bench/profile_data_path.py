#!/usr/bin/env python3
"""Where autosleepd's data path spends its time: py-spy on the running daemon under two loads.

1. wrk, 16 connections, small POST /v1/completions against the simulator answering at once;
2. 256 concurrent server-sent-event streams (bench/streams.py), each restarted on its
   connection, the simulator sending a token every 20 ms.

For each: the share of busy samples by library (the file of the innermost frame) and the top
functions by own time and by inclusive time. Writes bench/results/profile-<label>.md and the raw
collapsed stacks beside it.

    .venv/bin/python bench/profile_data_path.py --label after [--seconds 10]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import RESULTS, WRK_SCRIPT, Services, start_autosleepd, start_sim  # noqa: E402

PY_SPY = Path(sys.executable).parent / "py-spy"
# The frames every stack starts with: their inclusive share says nothing.
STARTUP = ("_run_module_as_main ", "_run_code ", "<module> ", "main ", "Runner.run ")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")


def area(path: str) -> str:
    """A frame's library: aiohttp, autosleepd.proxy, asyncio, httptools, ..."""
    path = "/" + path   # py-spy names files from their package: aiohttp/web_protocol.py
    if path.endswith("asyncio/runners.py"):
        # With --native off, time inside the event loop's C code (uvloop: polling, socket
        # calls, callback dispatch) shows as its Python caller, Runner.run.
        return "event loop (C, uvloop)"
    for name in ("autosleepd", "aiohttp", "asyncio", "uvloop", "httptools", "structlog",
                 "multidict", "yarl", "prometheus_client"):
        if f"/{name}/" in path:
            if name == "autosleepd":
                sub = path.split("/autosleepd/", 1)[1].split("/")
                return "autosleepd." + sub[0].removesuffix(".py")
            return name
    return "other (" + Path(path).name + ")"


def summarize(raw: Path, top: int = 12) -> dict:
    own = collections.Counter()
    inclusive = collections.Counter()
    areas = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        names = []
        for frame in frames:
            match = FRAME.match(frame)
            func, path = (match["func"], match["file"]) if match else (frame, "")
            names.append((f"{func} ({path})", path))
        if not names:
            continue
        own[names[-1][0]] += n
        areas[area(names[-1][1])] += n
        for name in {name for name, _ in names if not name.startswith(STARTUP)}:
            inclusive[name] += n
    share = lambda c: [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "by_area": share(areas), "own": share(own),
            "inclusive": share(inclusive)}


def record(pid: int, seconds: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([str(PY_SPY), "record", "-p", str(pid), "-d", str(seconds), "-r", "200",
                             "--nonblocking", "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def markdown(label: str, loads: dict) -> str:
    lines = [f"# Data-path profile: {label}", "",
             "py-spy 200 Hz on the autosleepd process; shares are of its busy samples.", ""]
    for name, data in loads.items():
        s = data["profile"]
        lines += [f"## {name}", "", f"load: {json.dumps(data['load'])}", "",
                  f"busy samples: {s['samples']}; autosleepd CPU: {data['cpu_cores']} cores", "",
                  "| by library (innermost frame) | % |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s["by_area"]]
        lines += ["", "| top own time | % |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in s["own"]]
        lines += ["", "| top inclusive time | % |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in s["inclusive"]]
        lines.append("")
    return "\n".join(lines)


def cpu_seconds(pid: int) -> float:
    import psutil
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="before / after: names the output files")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("profile: py-spy needs root (ptrace) to attach")
    RESULTS.mkdir(parents=True, exist_ok=True)
    loads = {}
    with tempfile.TemporaryDirectory() as workdir:
        services = Services(Path(workdir))
        try:
            script = Path(workdir) / "post.lua"
            script.write_text(WRK_SCRIPT)
            sim = start_sim(services)
            proxy, pid = start_autosleepd(services, sim, "auto")
            subprocess.run(["wrk", "-t", "2", "-c", "16", "-d", "2s", "-s", str(script),
                            proxy + "/v1/completions"], capture_output=True)
            raw = RESULTS / f"profile-{args.label}-wrk16.txt"
            before = cpu_seconds(pid)
            spy = record(pid, args.seconds, raw)
            out = subprocess.run(["wrk", "-t", "2", "-c", "16", "-d", f"{args.seconds}s", "-s",
                                  str(script), proxy + "/v1/completions"],
                                 capture_output=True, text=True).stdout
            cpu = cpu_seconds(pid) - before
            spy.wait(30)
            wrk = json.loads(next(l for l in out.splitlines() if l.startswith("WRK "))[4:])
            loads["wrk, 16 connections, small completions"] = {
                "load": {"requests": wrk["requests"],
                         "rps": round(wrk["requests"] / (wrk["duration_us"] / 1e6))},
                "cpu_cores": round(cpu / args.seconds, 3), "profile": summarize(raw)}
            services.stop()
            services.processes.clear()

            sim = start_sim(services, "--token", "20ms")
            proxy, pid = start_autosleepd(services, sim, "auto")
            raw = RESULTS / f"profile-{args.label}-streams256.txt"
            before = cpu_seconds(pid)
            spy = record(pid, args.seconds, raw)
            out = subprocess.run([sys.executable, str(Path(__file__).parent / "streams.py"), proxy,
                                  "--connections", "256", "--seconds", str(args.seconds),
                                  "--max-tokens", "50"], capture_output=True, text=True).stdout
            cpu = cpu_seconds(pid) - before
            spy.wait(30)
            streams = json.loads(next(l for l in out.splitlines() if l.startswith("STREAMS "))[8:])
            loads["256 concurrent streams, a token every 20 ms"] = {
                "load": streams, "cpu_cores": round(cpu / args.seconds, 3),
                "profile": summarize(raw)}
        finally:
            services.stop()
    text = markdown(args.label, loads)
    (RESULTS / f"profile-{args.label}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
