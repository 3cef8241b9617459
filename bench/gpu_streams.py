#!/usr/bin/env python3
"""1,024 concurrent streams through autosleepd on a real GPU: the token rate next to vLLM's own.

vLLM 0.26 serves the Qwen3-0.6B shape (dummy weights) with `--api-server-count 4`; autosleepd
stands in front of it. A load generator of several processes (each its own event loop with raw
protocols, bench/streams.py) keeps 1,024 streams running, each restarted on its connection as
it ends, in interleaved phases: direct, through autosleepd, through autosleepd, direct. For each
phase: tokens/s (finished streams x max_tokens / time), events/s, time to first event, failed
streams; for autosleepd's phases its CPU (cores); for every phase the load generator's busiest
process, to show the client was not the limit.

Checks: through autosleepd at least 0.95x the direct token rate (the means of the phases);
no failed stream; the load generator below 90% of a core per process.

    python3 bench/gpu_streams.py               # on the GPU machine (see bench/gpu_e2e.py, README)
    python3 bench/gpu_streams.py --sim         # the same flow against the simulator, here

Writes bench/results/gpu/gpu-streams-<engine>.json and .md; exits 0 only when every check holds.
Under 9 minutes: the engine's start (about 2 minutes), a warm-up and four phases of 40 s; a
second round that would not end within 8.5 minutes is skipped (and said so).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gpu"
MODELS = Path(os.environ.get("GPU_MODELS", "/tmp/w/models"))
ALLOWED = list(range(1024))   # at most 1024 allowed_token_ids: more kills vLLM 0.26's engine
RATIO_GOAL = 0.95
CLIENT_CORE_LIMIT = 0.9
TIME_BUDGET = 510.0   # seconds: phases that would end later are skipped (the script's limit is 9 min)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, timeout: float, process: subprocess.Popen) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(f"nothing listened on {port} within {timeout}s")


def wait_ready(url: str, timeout: float) -> None:
    """vLLM listens before its engine answers: wait for /health 200."""
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout}s")


class Processes:
    def __init__(self, out: Path):
        self.out = out
        self.all: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str], env: dict) -> subprocess.Popen:
        log = (self.out / f"gpu-streams-{name}.log").open("w")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.all.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.all):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.all):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def load_worker(job: tuple) -> dict:
    """One load-generator process: its share of the streams, on its own event loop."""
    url, connections, seconds, max_tokens, model, extra = job
    sys.path.insert(0, str(ROOT / "bench"))
    import asyncio
    import streams
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    started = time.process_time()
    with runner:
        result = runner.run(streams.run(url, connections, seconds, max_tokens, model=model,
                                        extra=extra, ttft_samples=True))
    result["cpu_seconds"] = time.process_time() - started
    return result


def cpu_seconds(processes: list) -> dict:
    """Each process's CPU seconds so far (user + system), by pid: (name, seconds)."""
    seen = {}
    for process in processes:
        try:
            seen[process.pid] = (process.name(), sum(process.cpu_times()[:2]))
        except psutil.Error:
            pass
    return seen


def phase(pool, url: str, args, model: str, extra: dict, pid: int | None, engine_pid: int | None = None) -> dict:
    share = [args.streams // args.clients + (i < args.streams % args.clients) for i in range(args.clients)]
    jobs = [(url, n, args.seconds, args.max_tokens, model, extra) for n in share if n]
    before = sum(psutil.Process(pid).cpu_times()[:2]) if pid else 0.0
    # vLLM's own processes (API servers, engine core): is a frontend the limit in this phase?
    engine = []
    if engine_pid:
        root = psutil.Process(engine_pid)
        engine = [root] + root.children(recursive=True)
    engine_before = cpu_seconds(engine)
    started = time.monotonic()
    parts = pool.map(load_worker, jobs)
    elapsed = time.monotonic() - started
    engine_after = cpu_seconds(engine)
    ttft = sorted(t for part in parts for t in part.pop("ttft_s"))
    streams = sum(p["streams"] for p in parts)
    result = {
        "seconds": round(elapsed, 2), "streams": streams,
        "failed_streams": sum(p["bad_status"] for p in parts)
        + sum(p["cut_streams"] for p in parts),
        "tokens_per_s": round((streams - sum(p["bad_status"] for p in parts)) * args.max_tokens / elapsed),
        "events_per_s": round(sum(p["events"] for p in parts) / elapsed),
        "coalesced_share": round(sum(p["reads_with_several_events"] for p in parts)
                                 / max(1, sum(p["reads"] for p in parts)), 4),
        "ttft_p50_ms": round(1000 * ttft[len(ttft) // 2], 2) if ttft else None,
        "ttft_p90_ms": round(1000 * ttft[int(len(ttft) * 0.9)], 2) if ttft else None,
        "client_busiest_core": round(max(p["cpu_seconds"] / elapsed for p in parts), 3),
    }
    if pid:
        result["autosleepd_cores"] = round((sum(psutil.Process(pid).cpu_times()[:2]) - before) / elapsed, 3)
    if engine_after:
        busy = sorted(((name, round((seconds - engine_before.get(p, (name, 0.0))[1]) / elapsed, 3))
                       for p, (name, seconds) in engine_after.items()), key=lambda item: -item[1])
        result["engine_busiest_processes_cores"] = busy[:6]
    return result


def report(results: dict) -> str:
    lines = [f"# {results['streams']} concurrent streams, {results['engine']}: direct and through "
             "autosleepd", "", f"`{results['command']}`; {results['machine']}", "",
             "| phase | tokens/s | events/s | TTFT p50 ms | TTFT p90 ms | failed | autosleepd cores "
             "| busiest client process (cores) | busiest vLLM processes (cores) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results["phases"]:
        lines.append(f"| {row['name']} | {row['tokens_per_s']} | {row['events_per_s']} | "
                     f"{row['ttft_p50_ms']} | {row['ttft_p90_ms']} | {row['failed_streams']} | "
                     f"{row.get('autosleepd_cores', '')} | {row['client_busiest_core']} | "
                     + ", ".join(f"{n} {c}" for n, c in row.get("engine_busiest_processes_cores", [])[:4]) + " |")
    lines += ["", "| check | value | met |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']} | {'yes' if c['met'] else 'NO'} |" for c in results["checks"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim", action="store_true", help="the simulator instead of vLLM")
    parser.add_argument("--streams", type=int, help="concurrent streams (1024; --sim: 128)")
    parser.add_argument("--clients", type=int, help="load-generator processes (8; --sim: 2)")
    parser.add_argument("--seconds", type=float, help="per phase (40; --sim: 8)")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    engine = "sim" if args.sim else "vllm"
    args.streams = args.streams or (128 if args.sim else 1024)
    args.clients = args.clients or (2 if args.sim else 8)
    args.seconds = args.seconds or (8 if args.sim else 40)
    if args.sim:
        args.max_tokens = min(args.max_tokens, 50)
    RESULTS.mkdir(parents=True, exist_ok=True)
    begun = time.monotonic()
    try:
        import httptools  # noqa: F401  (autosleepd's data path needs it)
    except ImportError:
        print("gpu_streams: httptools is not importable (PYTHONPATH=/tmp/site after install.sh "
              "has it); autosleepd cannot start")
        return 1
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    processes = Processes(RESULTS)
    engine_port, proxy_port = free_port(), free_port()
    model = "sim-model" if args.sim else "m"
    extra = {} if args.sim else {"ignore_eos": True, "allowed_token_ids": ALLOWED, "temperature": 0}
    results: dict = {"engine": engine, "streams": args.streams, "clients": args.clients,
                     "seconds_per_phase": args.seconds, "max_tokens": args.max_tokens,
                     "command": "python3 bench/gpu_streams.py" + (" --sim" if args.sim else ""),
                     "machine": f"{os.cpu_count()} cores", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        if args.sim:
            command = [sys.executable, "-m", "autosleepd", "sim", "--port", str(engine_port),
                       "--token", "20ms"]
        else:
            if not (MODELS / "qwen3-0.6b-shape").is_dir():
                print(f"gpu_streams: no model at {MODELS / 'qwen3-0.6b-shape'} (see "
                      "/work/shared/gpu-vllm/README.md); skipped")
                return 0
            command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve",
                       str(MODELS / "qwen3-0.6b-shape"), "--served-model-name", model,
                       "--load-format", "dummy", "--enable-sleep-mode", "--host", "127.0.0.1",
                       "--port", str(engine_port), "--gpu-memory-utilization", "0.85",
                       "--max-model-len", "2048", "--max-num-seqs", str(args.streams),
                       "--api-server-count", "4"]
            try:
                gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=30).stdout.strip()
                results["machine"] += f", {gpu}"
            except (OSError, subprocess.TimeoutExpired):
                pass
        engine_env = {**env, "VLLM_SERVER_DEV_MODE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0",
                      "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        started = time.monotonic()
        vllm = processes.start(engine, command, engine_env)
        wait_listening(engine_port, 300, vllm)
        direct = f"http://127.0.0.1:{engine_port}"
        wait_ready(direct, 300)
        results["engine_start_s"] = round(time.monotonic() - started, 1)
        sidecar = processes.start("autosleepd", [sys.executable, "-m", "autosleepd"], {
            **env, "AUTOSLEEPD_UPSTREAM": direct, "AUTOSLEEPD_HOST": "127.0.0.1",
            "AUTOSLEEPD_PORT": str(proxy_port), "AUTOSLEEPD_IDLE_TIMEOUT": "30m",
            "AUTOSLEEPD_LOG_FORMAT": "json", "AUTOSLEEPD_MAX_CONNECTIONS": str(4 * args.streams)})
        wait_listening(proxy_port, 60, sidecar)
        through = f"http://127.0.0.1:{proxy_port}"
        print(f"gpu_streams: engine ready in {results['engine_start_s']} s; {args.streams} streams "
              f"from {args.clients} processes, {args.seconds:g} s a phase", flush=True)
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.clients) as pool:
            warm = argparse.Namespace(**{**vars(args), "seconds": min(10.0, args.seconds)})
            phase(pool, direct, warm, model, extra, None)   # compiles, fills caches
            results["phases"] = []
            # Direct, autosleepd, autosleepd, direct: vLLM slowed down through a run on the
            # H100 (direct 28.6k tokens/s in the first phase, 23.6k in the third), and with this
            # order a steady drift weighs on both sides alike.
            for round_, order in ((1, ("direct", "autosleepd")), (2, ("autosleepd", "direct"))):
                # A round is a pair: run it whole or not at all (a phase takes about its
                # seconds plus the longest stream's tail).
                if time.monotonic() - begun + 2 * (args.seconds + 20) > TIME_BUDGET and results["phases"]:
                    results["skipped_rounds"] = f"round {round_}: not enough of the time budget left"
                    print(f"  {results['skipped_rounds']}", flush=True)
                    break
                sides = {"direct": (direct, None), "autosleepd": (through, sidecar.pid)}
                for name in order:
                    url, pid = sides[name]
                    row = {"name": f"{name} {round_}", **phase(pool, url, args, model, extra, pid,
                                                                vllm.pid)}
                    results["phases"].append(row)
                    print(f"  {row}", flush=True)
        rate = {name: statistics.mean(r["tokens_per_s"] for r in results["phases"]
                                        if r["name"].startswith(name)) for name in ("direct", "autosleepd")}
        ratio = round(rate["autosleepd"] / rate["direct"], 3) if rate["direct"] else 0.0
        failed = sum(r["failed_streams"] for r in results["phases"])
        busiest = max(r["client_busiest_core"] for r in results["phases"])
        results["ratio"] = ratio
        results["checks"] = [
            {"check": f"token rate through autosleepd / direct >= {RATIO_GOAL}", "value": ratio,
             "met": ratio >= RATIO_GOAL},
            {"check": "failed streams", "value": failed, "met": failed == 0},
            {"check": f"busiest load-generator process < {CLIENT_CORE_LIMIT} core", "value": busiest,
             "met": busiest < CLIENT_CORE_LIMIT},
        ]
    finally:
        processes.stop()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["total_s"] = round(time.monotonic() - begun, 1)
    (RESULTS / f"gpu-streams-{engine}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"gpu-streams-{engine}.md").write_text(report(results))
    print(report(results))
    return 0 if all(c["met"] for c in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
