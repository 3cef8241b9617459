#!/usr/bin/env python3
"""Worker processes (AUTOSLEEPD_WORKERS) in front of a vLLM with several API servers.

vLLM serving the Qwen3-0.6B shape with ``--api-server-count 4`` is loaded with 1,024 concurrent
streams from a load generator of several processes (so the client is not the limit): directly,
through autosleepd with 1 process, and through autosleepd with 4, in interleaved rounds. Before
the rounds, the 4-process autosleepd is put to sleep and a burst of 256 requests is sent while it
sleeps, over fresh connections (so every process holds some): one wake must serve them all.

Checks (exit 0 only when all hold): no stream failed; the burst got 256 right answers from one
wake, and vLLM's log shows no request reaching it asleep; through 4 processes the event rate is
at least 0.95x direct (the issue's goal). Writes bench/results/gpu/gpu-workers-<engine>.json and
.md.

    python3 bench/gpu_workers.py              # on the GPU machine (see README: Real GPU)
    python3 bench/gpu_workers.py --sim        # the same flow against the simulator, here
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_e2e import ROOT, Process, asleep_violations, greedy, post, skip_reason, wait_ok, wait_state  # noqa: E402

OUT = ROOT / "bench" / "results" / "gpu"
GOAL = 0.95


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ENGINE_PORT, ONE_PORT, FOUR_PORT = free_port(), free_port(), free_port()


def load(base: str, model: str, streams: int, seconds: float, tokens: int, out) -> None:
    """A load-generator process: ``streams`` streams back to back for ``seconds``."""

    async def one(http, end: float, tally: dict) -> None:
        while time.monotonic() < end:
            try:
                async with http.post(base + "/v1/completions",
                                     json=greedy(model, tokens=tokens, stream=True)) as response:
                    if response.status != 200:
                        tally["errors"] += 1
                        continue
                    async for line in response.content:
                        if line.startswith(b"data: ") and line != b"data: [DONE]\n":
                            tally["events"] += 1
                    tally["streams"] += 1
            except (aiohttp.ClientError, TimeoutError):
                tally["errors"] += 1

    async def main() -> dict:
        tally = {"events": 0, "streams": 0, "errors": 0}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=120)) as http:
            end = time.monotonic() + seconds
            await asyncio.gather(*(one(http, end, tally) for _ in range(streams)))
        return tally

    out.send(asyncio.run(main()))


def measure(base: str, model: str, args) -> dict:
    """All load processes at once; events/s over the run (streams finishing after the end count:
    every process waits for its own last streams, so the time is taken at the last one's end)."""
    pipes, processes = [], []
    per = args.streams // args.processes
    started = time.monotonic()
    for _ in range(args.processes):
        mine, theirs = multiprocessing.Pipe(duplex=False)
        process = multiprocessing.Process(target=load, args=(base, model, per, args.seconds,
                                                              args.tokens, theirs))
        process.start()
        pipes.append(mine)
        processes.append(process)
    tallies = [pipe.recv() for pipe in pipes]
    elapsed = time.monotonic() - started
    for process in processes:
        process.join()
    total = {key: sum(t[key] for t in tallies) for key in tallies[0]}
    return {**total, "seconds": round(elapsed, 2), "events_per_s": round(total["events"] / elapsed, 1)}


async def burst_while_asleep(base: str, model: str, count: int) -> dict:
    """``count`` requests on fresh connections into a sleeping autosleepd: each gets a right answer."""
    async with aiohttp.ClientSession() as http:
        await wait_state(http, base, "awake")
        await post(http, base + "/autosleepd/sleep")
        await wait_state(http, base, "asleep")
        wakes_before = (await (await http.get(base + "/autosleepd/status")).json())["wakes"]

    async def one() -> int:
        async with aiohttp.ClientSession() as fresh:   # its own connection: any process takes it
            async with fresh.post(base + "/v1/completions", json=greedy(model, tokens=4)) as response:
                await response.read()
                return response.status

    started = time.monotonic()
    statuses = await asyncio.gather(*(one() for _ in range(count)))
    async with aiohttp.ClientSession() as http:
        wakes = (await (await http.get(base + "/autosleepd/status")).json())["wakes"] - wakes_before
    return {"requests": count, "ok": statuses.count(200), "wakes": wakes,
            "last_answer_s": round(time.monotonic() - started, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim", action="store_true", help="the simulator instead of vLLM")
    parser.add_argument("--streams", type=int, default=None, help="concurrent streams (1024; 64 with --sim)")
    parser.add_argument("--processes", type=int, default=8, help="load-generator processes")
    parser.add_argument("--seconds", type=float, default=None, help="per run (20; 4 with --sim)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="per stream")
    args = parser.parse_args()
    engine = "sim" if args.sim else "vllm"
    args.streams = args.streams or (64 if args.sim else 1024)
    args.seconds = args.seconds or (4 if args.sim else 20)
    reason = skip_reason(engine)
    if reason:
        print(f"gpu_workers: skipped: {reason}")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    logs = Path(os.environ.get("GPU_LOGS", "/tmp/gpu-workers"))
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "VLLM_SERVER_DEV_MODE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1"}
    model = "sim-model" if args.sim else "m"
    if args.sim:
        command = [sys.executable, "-m", "autosleepd", "sim", "--port", str(ENGINE_PORT),
                   "--token", "0.002", "--wake", "0.3", "--model", model]
    else:
        models = Path(os.environ.get("GPU_MODELS", "/tmp/w/models"))
        command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve",
                   str(models / "qwen3-0.6b-shape"), "--served-model-name", model,
                   "--enable-sleep-mode", "--host", "127.0.0.1", "--port", str(ENGINE_PORT),
                   "--gpu-memory-utilization", "0.8", "--max-model-len", "4096",
                   "--load-format", "dummy", "--enforce-eager", "--api-server-count", "4",
                   "--enable-log-requests"]
    processes = [Process("engine", command, env, logs / "engine.log")]
    results: dict = {"engine": engine, "streams": args.streams, "load_processes": args.processes,
                     "seconds": args.seconds, "tokens": args.tokens,
                     "command": "python3 bench/gpu_workers.py" + (" --sim" if args.sim else ""),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count()}
    targets = {"direct": f"http://127.0.0.1:{ENGINE_PORT}"}
    try:
        asyncio.run(_wait(targets["direct"] + "/health", 300))
        for name, port, workers in (("autosleepd 1 process", ONE_PORT, 1),
                                    ("autosleepd 4 processes", FOUR_PORT, 4)):
            processes.append(Process(name, [sys.executable, "-m", "autosleepd"], {
                **env, "AUTOSLEEPD_UPSTREAM": targets["direct"], "AUTOSLEEPD_HOST": "127.0.0.1",
                "AUTOSLEEPD_PORT": str(port), "AUTOSLEEPD_LOG_FORMAT": "json",
                "AUTOSLEEPD_IDLE_TIMEOUT": "0", "AUTOSLEEPD_WAKE_TIMEOUT": "300s",
                "AUTOSLEEPD_WORKERS": str(workers)}, logs / f"autosleepd-{workers}.log"))
            targets[name] = f"http://127.0.0.1:{port}"
            asyncio.run(_wait(targets[name] + "/autosleepd/healthz", 60))
        results["burst"] = asyncio.run(burst_while_asleep(targets["autosleepd 4 processes"], model, 256))
        print(f"burst: {results['burst']}", flush=True)
        runs: dict = {name: [] for name in targets}
        for round_ in range(args.rounds):
            for name, base in targets.items():
                run = measure(base, model, args)
                runs[name].append(run)
                print(f"round {round_ + 1} {name:24} {run['events_per_s']:>9.1f} events/s  "
                      f"{run['streams']} streams  {run['errors']} errors", flush=True)
        results["runs"] = runs
        sim_violations = asyncio.run(_sim_violations(targets["direct"])) if args.sim else None
    finally:
        for process in reversed(processes):
            process.stop()
    results["asleep_violations"] = (asleep_violations(logs / "engine.log") if not args.sim
                                    else {"received_while_asleep": sim_violations})
    rate = {name: statistics.median(run["events_per_s"] for run in got) for name, got in runs.items()}
    results["events_per_s"] = rate
    results["ratio_4_processes"] = round(rate["autosleepd 4 processes"] / rate["direct"], 3)
    results["ratio_1_process"] = round(rate["autosleepd 1 process"] / rate["direct"], 3)
    checks = {
        "no stream failed": all(run["errors"] == 0 for got in runs.values() for run in got),
        "burst: 256 right answers, one wake": results["burst"]["ok"] == 256 and results["burst"]["wakes"] == 1,
        "no request reached the engine asleep": results["asleep_violations"]["received_while_asleep"] == 0,
        f"4 processes at least {GOAL}x direct": results["ratio_4_processes"] >= GOAL,
    }
    results["checks"] = checks
    name = f"gpu-workers-{engine}"
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Worker processes in front of {engine} ({results['command']}, {results['cpus']} CPUs)", "",
             f"{args.streams} concurrent streams of {args.tokens} tokens from {args.processes} "
             f"load processes, {args.seconds:g} s a run, median of {args.rounds} interleaved rounds.", "",
             "| target | events/s | vs direct |", "|---|---|---|"]
    lines += [f"| {n} | {r:.0f} | {r / rate['direct']:.3f}x |" for n, r in rate.items()]
    lines += ["", f"Burst of 256 while asleep through 4 processes: {results['burst']}", "",
              *[f"- {'PASS' if ok else 'FAIL'}: {check}" for check, ok in checks.items()]]
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(checks.values()) else 1


async def _sim_violations(base: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/sim/stats") as response:
            return (await response.json())["violations"].get("request_while_asleep", 0)


async def _wait(url: str, timeout: float) -> None:
    async with aiohttp.ClientSession() as http:
        await wait_ok(http, url, timeout)


if __name__ == "__main__":
    sys.exit(main())
