#!/usr/bin/env python3
"""1,024 concurrent streams through autosleepd on a real GPU: the token rate next to vLLM's own.

vLLM 0.26 serves the Qwen3-0.6B shape (dummy weights) with `--api-server-count 4`; autosleepd
stands in front of it with one process, and another with 4 worker processes
(AUTOSLEEPD_WORKERS). A load generator of several processes (each its own event loop with raw
protocols, bench/streams.py) keeps 1,024 streams running, each restarted on its connection as
it ends, in rounds whose order rotates (direct, 1 process, 4 processes; then 1, 4, direct; ...),
so that vLLM's drift over a run weighs on every side alike.

Each phase measures a steady state: the streams open spread over a few seconds (streams of one
length would otherwise start and end in waves), their tokens are counted within a window of
wall-clock time shared by every load process, and at its end every connection is closed. So the
figure is the rate while 1,024 streams run, with no ramp and no tail of lone streams. The
engine's own count (vllm:generation_tokens_total on /metrics, read at the window's edges) is
given beside the client's. For each phase: autosleepd's CPU, the load generator's busiest
process, and vLLM's busiest processes.

Checks: autosleepd as it runs by default (one process) at least 0.95x the direct token rate
(medians over the rounds); no failed stream; the load generator below 90% of a core per process.
The worker processes' ratio is reported beside it, not checked: it is what the default's choice
rests on.

    python3 bench/gpu_streams.py               # on the GPU machine (see bench/gpu_e2e.py, README)
    python3 bench/gpu_streams.py --sim         # the same flow against the simulator, here

Writes bench/results/gpu/gpu-streams-<engine>.json and .md; exits 0 only when every check holds.
About 8 minutes: the engine's start (about 2.5 minutes), a warm-up and rounds of three phases of
26 s; a round that would not end within the time budget is skipped (and said so).
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
    url, connections, start_at, stagger, window, max_tokens, model, extra = job
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
        result = runner.run(streams.run_steady(url, connections, start_at, stagger, window,
                                               max_tokens, model=model, extra=extra))
    result["cpu_seconds"] = time.process_time() - started
    return result


ENGINE_SERIES = ("vllm:generation_tokens_total", "vllm:num_requests_running",
                 "vllm:num_requests_waiting")


def engine_series(url: str) -> dict[str, float]:
    """vLLM's own figures from /metrics, each summed over its labels (absent when not given)."""
    import urllib.request
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ENGINE_SERIES:
            found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def cpu_seconds(processes: list) -> dict:
    """Each process's CPU seconds so far (user + system), by pid: (name, seconds)."""
    seen = {}
    for process in processes:
        try:
            seen[process.pid] = (process.name(), sum(process.cpu_times()[:2]))
        except psutil.Error:
            pass
    return seen


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process and its children (autosleepd's worker processes)."""
    if not pid:
        return 0.0
    root = psutil.Process(pid)
    return sum(seconds for _, seconds in cpu_seconds([root] + root.children(recursive=True)).values())


def phase(pool, url: str, args, model: str, extra: dict, pid: int | None, engine_url: str,
          engine_pid: int | None = None) -> dict:
    share = [args.streams // args.clients + (i < args.streams % args.clients) for i in range(args.clients)]
    start_at = time.time() + 1.0            # every load process starts together
    window = (start_at + args.stagger + args.settle, start_at + args.stagger + args.settle + args.window)
    jobs = [(url, n, start_at, args.stagger, window, args.max_tokens, model, extra) for n in share if n]
    # vLLM's own processes (API servers, engine core): is a frontend the limit in this phase?
    engine = []
    if engine_pid:
        root = psutil.Process(engine_pid)
        engine = [root] + root.children(recursive=True)
    pending = pool.map_async(load_worker, jobs)
    time.sleep(max(0.0, window[0] - time.time()))
    before = tree_cpu(pid)
    engine_before = cpu_seconds(engine)
    series_before = engine_series(engine_url)
    # mid-window: how many requests vLLM runs and queues (is the same load reaching it?)
    time.sleep(max(0.0, (window[0] + window[1]) / 2 - time.time()))
    series_mid = engine_series(engine_url)
    time.sleep(max(0.0, window[1] - time.time()))
    series_after = engine_series(engine_url)
    tokens = "vllm:generation_tokens_total"
    engine_after = cpu_seconds(engine)
    after = tree_cpu(pid)
    elapsed = window[1] - window[0]
    parts = pending.get(args.window + args.stagger + args.settle + 60)
    ttft = sorted(t for part in parts for t in part.pop("ttft_s"))
    result = {
        "window_s": round(elapsed, 2), "streams_finished": sum(p["streams"] for p in parts),
        "failed_streams": sum(p["bad_status"] for p in parts) + sum(p["cut_streams"] for p in parts),
        "tokens_per_s": round(sum(p["window_tokens"] for p in parts) / elapsed),
        "engine_tokens_per_s": (round((series_after[tokens] - series_before[tokens]) / elapsed)
                                if tokens in series_before and tokens in series_after else None),
        "engine_running_mid": series_mid.get("vllm:num_requests_running"),
        "engine_waiting_mid": series_mid.get("vllm:num_requests_waiting"),
        "coalesced_share": round(sum(p["reads_with_several_events"] for p in parts)
                                 / max(1, sum(p["reads"] for p in parts)), 4),
        "ttft_p50_ms": round(1000 * ttft[len(ttft) // 2], 2) if ttft else None,
        "ttft_p90_ms": round(1000 * ttft[int(len(ttft) * 0.9)], 2) if ttft else None,
        # the load's CPU over its whole phase, against the phase's length
        "client_busiest_core": round(max(p["cpu_seconds"] for p in parts)
                                     / (window[1] - start_at), 3),
    }
    if pid:
        result["autosleepd_cores"] = round((after - before) / elapsed, 3)
    if engine_after:
        busy = sorted(((name, round((seconds - engine_before.get(p, (name, 0.0))[1]) / elapsed, 3))
                       for p, (name, seconds) in engine_after.items()), key=lambda item: -item[1])
        result["engine_busiest_processes_cores"] = busy[:6]
    return result


def report(results: dict) -> str:
    lines = [f"# {results['streams']} concurrent streams, {results['engine']}: direct and through "
             "autosleepd", "", f"`{results['command']}`; {results['machine']}; streams of "
             f"{results['max_tokens']} tokens; a {results['window_s']:g} s window a phase", "",
             "| phase | tokens/s (client) | tokens/s (engine) | running / waiting in vLLM (mid-window) "
             "| TTFT p50 ms | TTFT p90 ms | failed | autosleepd cores | busiest client process (cores) "
             "| busiest vLLM processes (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["phases"]:
        lines.append(f"| {row['name']} | {row['tokens_per_s']} | {row['engine_tokens_per_s']} | "
                     f"{row['engine_running_mid']} / {row['engine_waiting_mid']} | {row['ttft_p50_ms']} | {row['ttft_p90_ms']} | {row['failed_streams']} | "
                     f"{row.get('autosleepd_cores', '')} | {row['client_busiest_core']} | "
                     + ", ".join(f"{n} {c}" for n, c in row.get("engine_busiest_processes_cores", [])[:4]) + " |")
    lines += ["", "| side | median tokens/s (client) | vs direct | median tokens/s (engine) | vs direct |",
              "|---|---|---|---|---|"]
    for side, got in results["sides"].items():
        lines.append(f"| {side} | {got['tokens_per_s']} | {got['ratio']} | "
                     f"{got['engine_tokens_per_s']} | {got['engine_ratio']} |")
    lines += ["", "| check | value | met |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']} | {'yes' if c['met'] else 'NO'} |" for c in results["checks"]]
    return "\n".join(lines) + "\n"


def rotations(sides: list[str], rounds: int) -> list[list[str]]:
    """Round k starts with side k: each side takes each place in the order equally often."""
    return [sides[k % len(sides):] + sides[:k % len(sides)] for k in range(rounds)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim", action="store_true", help="the simulator instead of vLLM")
    parser.add_argument("--streams", type=int, help="concurrent streams (1024; --sim: 128)")
    parser.add_argument("--clients", type=int, help="load-generator processes (8; --sim: 2)")
    parser.add_argument("--window", type=float, help="seconds counted a phase (16; --sim: 5)")
    parser.add_argument("--stagger", type=float, help="seconds over which streams open (6; --sim: 1)")
    parser.add_argument("--settle", type=float, help="seconds after that before counting (2; --sim: 1)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4, help="the second autosleepd's processes (0: none)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--budget", type=float, default=TIME_BUDGET,
                        help=f"seconds after which no round starts that would not end ({TIME_BUDGET:g})")
    args = parser.parse_args()
    engine = "sim" if args.sim else "vllm"
    args.streams = args.streams or (128 if args.sim else 1024)
    args.clients = args.clients or (2 if args.sim else 8)
    args.window = args.window or (5 if args.sim else 16)
    args.stagger = args.stagger or (1 if args.sim else 6)
    args.settle = args.settle or (1 if args.sim else 2)
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
    engine_port = free_port()
    model = "sim-model" if args.sim else "m"
    extra = {} if args.sim else {"ignore_eos": True, "allowed_token_ids": ALLOWED, "temperature": 0}
    results: dict = {"engine": engine, "streams": args.streams, "clients": args.clients,
                     "window_s": args.window, "stagger_s": args.stagger, "settle_s": args.settle,
                     "max_tokens": args.max_tokens,
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
        sides = {"direct": (direct, None)}
        for name, workers in (("autosleepd", 1), (f"autosleepd {args.workers} processes", args.workers)):
            if workers < 1 or name in sides:
                continue
            port = free_port()
            sidecar = processes.start(f"{engine}-{name}".replace(" ", "-"), [sys.executable, "-m", "autosleepd"], {
                **env, "AUTOSLEEPD_UPSTREAM": direct, "AUTOSLEEPD_HOST": "127.0.0.1",
                "AUTOSLEEPD_PORT": str(port), "AUTOSLEEPD_IDLE_TIMEOUT": "30m",
                "AUTOSLEEPD_LOG_FORMAT": "json", "AUTOSLEEPD_WORKERS": str(workers),
                "AUTOSLEEPD_MAX_CONNECTIONS": str(4 * args.streams)})
            wait_listening(port, 60, sidecar)
            sides[name] = (f"http://127.0.0.1:{port}", sidecar.pid)
        print(f"gpu_streams: engine ready in {results['engine_start_s']} s; {args.streams} streams "
              f"from {args.clients} processes, {args.window:g} s counted a phase", flush=True)
        phase_s = args.stagger + args.settle + args.window + 2
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.clients) as pool:
            warm = argparse.Namespace(**{**vars(args), "window": 3.0})
            for url, _ in sides.values():         # compiles, fills caches, opens every path
                phase(pool, url, warm, model, extra, None, direct)
            results["phases"] = []
            for round_, order in enumerate(rotations(list(sides), args.rounds), 1):
                # A round is whole or not at all: every side once, in its place.
                if time.monotonic() - begun + len(order) * phase_s > args.budget and results["phases"]:
                    results["skipped_rounds"] = f"from round {round_}: not enough of the time budget left"
                    print(f"  {results['skipped_rounds']}", flush=True)
                    break
                for name in order:
                    url, pid = sides[name]
                    row = {"name": f"{name} {round_}", "side": name,
                           **phase(pool, url, args, model, extra, pid, direct, vllm.pid)}
                    results["phases"].append(row)
                    print(f"  {row}", flush=True)
        results["sides"] = {}
        for name in sides:
            rows = [r for r in results["phases"] if r["side"] == name]
            engine_rates = [r["engine_tokens_per_s"] for r in rows if r["engine_tokens_per_s"] is not None]
            results["sides"][name] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
                                      "engine_tokens_per_s": statistics.median(engine_rates) if engine_rates else None}
        base = results["sides"]["direct"]
        for got in results["sides"].values():
            got["ratio"] = round(got["tokens_per_s"] / base["tokens_per_s"], 3)
            got["engine_ratio"] = (round(got["engine_tokens_per_s"] / base["engine_tokens_per_s"], 3)
                                   if got["engine_tokens_per_s"] and base["engine_tokens_per_s"] else None)
        failed = sum(r["failed_streams"] for r in results["phases"])
        busiest = max(r["client_busiest_core"] for r in results["phases"])
        ratio = results["sides"]["autosleepd"]["ratio"]
        results["checks"] = [
            {"check": f"autosleepd (1 process, the default): token rate / direct >= {RATIO_GOAL}",
             "value": ratio, "met": ratio >= RATIO_GOAL},
            {"check": "failed streams", "value": failed, "met": failed == 0},
            {"check": f"busiest load-generator process < {CLIENT_CORE_LIMIT} core", "value": busiest,
             "met": busiest < CLIENT_CORE_LIMIT},
        ]
    finally:
        processes.stop()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["total_s"] = round(time.monotonic() - begun, 1)
    (RESULTS / f"gpu-streams-{engine}.json").write_text(json.dumps(results, indent=2))
    if "checks" in results:
        (RESULTS / f"gpu-streams-{engine}.md").write_text(report(results))
        print(report(results))
    return 0 if all(c["met"] for c in results.get("checks", [{"met": False}])) else 1


if __name__ == "__main__":
    sys.exit(main())
