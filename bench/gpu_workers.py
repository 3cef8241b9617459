#!/usr/bin/env python3
"""Worker processes (AUTOSLEEPD_WORKERS) in front of a real vLLM: held work and one wake.

vLLM serving the Qwen3-0.6B shape with ``--api-server-count 4`` stands behind an autosleepd of
4 processes. Several times over, autosleepd is put to sleep and a burst of 256 requests is sent
while it sleeps, over fresh connections (so every process holds some): one wake must serve them
all, each with a right answer, and vLLM's request log must show no request reaching it asleep.
(The token rate through 1 and 4 processes, next to direct, is bench/gpu_streams.py's.)

Checks (exit 0 only when all hold): every burst got 256 right answers from one wake; no request
reached the engine asleep. Writes bench/results/gpu/gpu-workers-<engine>.json and .md.

    python3 bench/gpu_workers.py              # on the GPU machine (see README: Real GPU)
    python3 bench/gpu_workers.py --sim        # the same flow against the simulator, here
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_e2e import ROOT, Process, asleep_violations, greedy, post, skip_reason, wait_ok, wait_state  # noqa: E402

OUT = ROOT / "bench" / "results" / "gpu"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ENGINE_PORT, FOUR_PORT = free_port(), free_port()


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
    parser.add_argument("--bursts", type=int, default=3, help="sleep, burst, wake cycles")
    parser.add_argument("--requests", type=int, default=256, help="in each burst")
    args = parser.parse_args()
    engine = "sim" if args.sim else "vllm"
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
    results: dict = {"engine": engine, "autosleepd_processes": 4, "requests_per_burst": args.requests,
                     "command": "python3 bench/gpu_workers.py" + (" --sim" if args.sim else ""),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count()}
    direct = f"http://127.0.0.1:{ENGINE_PORT}"
    through = f"http://127.0.0.1:{FOUR_PORT}"
    try:
        asyncio.run(_wait(direct + "/health", 300))
        processes.append(Process("autosleepd", [sys.executable, "-m", "autosleepd"], {
            **env, "AUTOSLEEPD_UPSTREAM": direct, "AUTOSLEEPD_HOST": "127.0.0.1",
            "AUTOSLEEPD_PORT": str(FOUR_PORT), "AUTOSLEEPD_LOG_FORMAT": "json",
            "AUTOSLEEPD_IDLE_TIMEOUT": "0", "AUTOSLEEPD_WAKE_TIMEOUT": "300s",
            "AUTOSLEEPD_WORKERS": "4"}, logs / "autosleepd-4.log"))
        asyncio.run(_wait(through + "/autosleepd/healthz", 60))
        results["bursts"] = []
        for _ in range(args.bursts):
            burst = asyncio.run(burst_while_asleep(through, model, args.requests))
            results["bursts"].append(burst)
            print(f"burst: {burst}", flush=True)
        sim_violations = asyncio.run(_sim_violations(direct)) if args.sim else None
    finally:
        for process in reversed(processes):
            process.stop()
    results["asleep_violations"] = (asleep_violations(logs / "engine.log") if not args.sim
                                    else {"received_while_asleep": sim_violations})
    checks = {
        f"every burst: {args.requests} right answers, one wake": all(
            b["ok"] == args.requests and b["wakes"] == 1 for b in results["bursts"]),
        "no request reached the engine asleep": results["asleep_violations"]["received_while_asleep"] == 0,
    }
    results["checks"] = checks
    name = f"gpu-workers-{engine}"
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Held bursts through 4 autosleepd processes in front of {engine} "
             f"({results['command']}, {results['cpus']} CPUs)", "",
             "| burst | requests | right answers | wakes | last answer (s) |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {b['requests']} | {b['ok']} | {b['wakes']} | {b['last_answer_s']} |"
              for i, b in enumerate(results["bursts"], 1)]
    lines += ["", f"Requests that reached the engine asleep: {results['asleep_violations']}", "",
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
