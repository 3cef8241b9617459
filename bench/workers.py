#!/usr/bin/env python3
"""What worker processes (AUTOSLEEPD_WORKERS) buy, measured side by side in one run.

The simulator (immediate small completions) behind autosleepd with 1, 2 and 4 processes (the
owner and its workers), loaded by wrk at 1, 16 and 64 connections, in interleaved rounds (so a
neighbour's load falls on every setting alike); the median of the rounds is reported, with the
CPU of autosleepd's whole process tree per request. On a machine of few cores the load generator
and the simulator share the cores with autosleepd: read the ratios, not the absolute figures.

Writes bench/results/workers.json and bench/results/workers.md.

    .venv/bin/python bench/workers.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import psutil

from bench import RESULTS, WRK_SCRIPT, Services, start_autosleepd, start_sim, wrk

SETTINGS = (1, 2, 4)
CONNECTIONS = (1, 16, 64)


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds used so far by a process and each of its live children, by PID."""
    process = psutil.Process(pid)
    used = {}
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
            used[member.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return used


def measure(services: Services, seconds: int, rounds: int) -> dict:
    script = services.workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    sim = start_sim(services)
    daemons = {workers: start_autosleepd(services, sim, "uvloop", workers=workers)
               for workers in SETTINGS}
    runs: dict = {}
    for round_ in range(rounds):
        for connections in CONNECTIONS:
            run = wrk(sim, connections, seconds, script)   # the ceiling: the simulator alone
            runs.setdefault(f"direct c={connections}", []).append({**run, "cpu_cores": 0.0,
                                                                    "cpu_us_per_request": 0.0})
            for workers, (url, pid) in daemons.items():
                wrk(url, connections, 1, script)   # warm-up: connections spread, caches filled
                before = tree_cpu(pid)
                run = wrk(url, connections, seconds, script)
                after = tree_cpu(pid)
                # per process, owner first: how evenly the shared socket spreads connections
                run["cpu_cores_by_process"] = [round((after[p] - before.get(p, 0.0)) / seconds, 3)
                                               for p in after]
                run["cpu_cores"] = round(sum(run["cpu_cores_by_process"]), 3)
                run["cpu_us_per_request"] = round(run["cpu_cores"] * 1e6 / run["rps"], 1)
                runs.setdefault(f"{workers} c={connections}", []).append(run)
                print(f"  round {round_ + 1} workers={workers} c={connections:<3} {run['rps']:>9.1f} rps"
                      f"  p50 {run['percentiles_us']['50'] / 1000:.3f} ms  cpu {run['cpu_cores']:.2f} cores",
                      flush=True)
    summary = {}
    for key, got in runs.items():
        by_process = [run["cpu_cores_by_process"] for run in got if "cpu_cores_by_process" in run]
        summary[key] = {
            "rps": statistics.median(run["rps"] for run in got),
            "p50_ms": statistics.median(run["percentiles_us"]["50"] for run in got) / 1000,
            "p99_ms": statistics.median(run["percentiles_us"]["99"] for run in got) / 1000,
            "cpu_cores": statistics.median(run["cpu_cores"] for run in got),
            "cpu_us_per_request": statistics.median(run["cpu_us_per_request"] for run in got),
            "errors": sum(run["errors"] + run["status_errors"] for run in got),
            "cpu_cores_by_process": by_process[len(by_process) // 2] if by_process else None,
        }
    return {"runs": runs, "summary": summary}


def report(results: dict) -> str:
    summary = results["summary"]
    lines = [f"# Worker processes ({results['machine']['cpus']} CPUs, {results['command']})", "",
             f"Median of {results['rounds']} interleaved rounds of {results['seconds']} s each; "
             "CPU is autosleepd's whole process tree (in brackets, per process, owner first, in the "
             "middle round); ratios against 1 process in the same run.", "",
             "| connections | processes | requests/s | vs 1 | p50 ms | p99 ms | CPU cores | CPU us/request | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for connections in CONNECTIONS:
        base = summary[f"1 c={connections}"]["rps"]
        direct = summary[f"direct c={connections}"]
        lines.append(f"| {connections} | direct | {direct['rps']:.0f} | {direct['rps'] / base:.2f}x | "
                     f"{direct['p50_ms']:.3f} | {direct['p99_ms']:.3f} | | | {direct['errors']} |")
        for workers in SETTINGS:
            s = summary[f"{workers} c={connections}"]
            spread = "+".join(f"{c:.2f}" for c in s["cpu_cores_by_process"])
            lines.append(f"| {connections} | {workers} | {s['rps']:.0f} | {s['rps'] / base:.2f}x | "
                         f"{s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['cpu_cores']:.2f} ({spread}) | "
                         f"{s['cpu_us_per_request']:.0f} | {s['errors']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, to check the script")
    args = parser.parse_args()
    seconds, rounds = (2, 1) if args.quick else (5, 3)
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, lambda number, _: sys.exit(128 + number))
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "command": "python bench/workers.py" + (" --quick" if args.quick else ""),
               "seconds": seconds, "rounds": rounds}
    with tempfile.TemporaryDirectory() as workdir:
        services = Services(Path(workdir))
        try:
            results.update(measure(services, seconds, rounds))
        finally:
            services.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "workers.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "workers.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
