#!/usr/bin/env python3
"""autosleepd in front of real vLLM on a real GPU: the figures users care about, side by side.

Part 1 (one engine, Qwen3-8B shape with real random weights): vLLM alone and through autosleepd,
level 1 and level 2. The first answer after an idle sleep next to vLLM's own wake plus a steady
request; GPU memory awake and asleep as autosleepd's probe and nvidia-smi read it; a burst of 100
requests while asleep; a stream; greedy output before and after every wake; vLLM's own request log
checked for requests that reached it asleep.

Part 2 (two engines on one GPU, 8B shape and 0.6B shape at --gpu-memory-utilization 0.6 each, one
sidecar each, sharing a coordination directory): traffic A, B, A, B, A, B, each switch timed next
to the cold start of the same server.

    python3 bench/gpu_e2e.py --part 1 --out DIR      # on the GPU machine (see README)
    python3 bench/gpu_e2e.py --engine sim --out DIR  # the same steps against the simulator

It skips itself with a message, exit 0, where no GPU or no vLLM is found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("GPU_MODELS", "/tmp/w/models"))
ALLOWED = list(range(1024))   # at most 1024 allowed_token_ids: more kills vLLM 0.26's engine


def greedy(model: str, prompt: str = "The quick brown fox", tokens: int = 16, stream=False) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "allowed_token_ids": ALLOWED, "ignore_eos": True, "stream": stream}


class Process:
    def __init__(self, name: str, command: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        self.handle = log.open("w")
        self.popen = subprocess.Popen(command, env=env, stdout=self.handle, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.handle.close()


class Run:
    def __init__(self, args):
        self.engine = args.engine
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.processes: list[Process] = []
        self.results: dict = {"engine": args.engine, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        self.model = "sim-model" if self.engine == "sim" else "m"
        self.wake_check = args.wake_check
        self.results["wake_check"] = args.wake_check

    # ----- processes --------------------------------------------------------------------------

    def start_engine(self, name: str, model_dir: str, port: int, utilization: float,
                     dummy: bool = False, api_key: str | None = None,
                     vllm_args: tuple[str, ...] = ()) -> Process:
        if self.engine == "sim":
            command = [sys.executable, "-m", "autosleepd", "sim", "--port", str(port), "--load", "1s",
                       "--sleep", "0.3", "--wake", "0.6", "--reload", "1", "--token", "0.01",
                       "--model", self.model]
        else:
            command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(MODELS / model_dir),
                       "--served-model-name", self.model, "--enable-sleep-mode", "--host", "127.0.0.1",
                       "--port", str(port), "--gpu-memory-utilization", str(utilization),
                       "--max-model-len", "4096", "--enable-log-requests"]
            if dummy:
                command += ["--load-format", "dummy"]
            command += vllm_args
        if api_key:
            command += ["--api-key", api_key]   # the same flag for vLLM and the simulator
        env = {**self.env, "VLLM_SERVER_DEV_MODE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0",
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        process = Process(name, command, env, self.out / f"{name}.log")
        self.processes.append(process)
        return process

    def start_sidecar(self, name: str, upstream_port: int, port: int, **settings) -> Process:
        env = {**self.env, "AUTOSLEEPD_UPSTREAM": f"http://127.0.0.1:{upstream_port}",
               "AUTOSLEEPD_HOST": "127.0.0.1", "AUTOSLEEPD_PORT": str(port),
               "AUTOSLEEPD_LOG_FORMAT": "json", "AUTOSLEEPD_WAKE_TIMEOUT": "300s",
               **{f"AUTOSLEEPD_{k.upper()}": str(v) for k, v in settings.items()}}
        process = Process(name, [sys.executable, "-m", "autosleepd"], env, self.out / f"{name}.log")
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    # ----- readings ---------------------------------------------------------------------------

    def nvidia_smi(self) -> dict | None:
        if not shutil.which("nvidia-smi"):
            return None
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
        name, used, total = [x.strip() for x in out.splitlines()[0].split(",")]
        return {"gpu": name, "used_mib": int(used), "total_mib": int(total)}


async def wait_ok(http: aiohttp.ClientSession, url: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


async def status(http, base: str) -> dict:
    async with http.get(base + "/autosleepd/status") as response:
        return await response.json()


async def wait_state(http, base: str, state: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    current = {"state": "not listening"}
    while time.monotonic() < deadline:
        try:
            current = await status(http, base)
        except aiohttp.ClientConnectionError:
            pass   # still starting
        if current["state"] == state:
            return current
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{base} did not reach {state} within {timeout}s (last: {current['state']})")


async def complete(http, base: str, body: dict) -> tuple[float, str]:
    started = time.monotonic()
    async with http.post(base + "/v1/completions", json=body) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{base}: {response.status} {answer}")
    return time.monotonic() - started, answer["choices"][0]["text"]


async def post(http, url: str, payload=None) -> float:
    started = time.monotonic()
    async with http.post(url, json=payload) as response:
        body = await response.text()
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {body[:300]}")
    return time.monotonic() - started


async def direct_wake(http, base: str, level: int) -> float:
    """vLLM's own wake, as autosleepd does it, timed."""
    if level == 1:
        return await post(http, base + "/wake_up")
    return (await post(http, base + "/wake_up?tags=weights")
            + await post(http, base + "/collective_rpc", {"method": "reload_weights"})
            + await post(http, base + "/wake_up?tags=kv_cache"))


async def stream_gaps(http, base: str, body: dict) -> dict:
    arrivals = []
    async with http.post(base + "/v1/completions", json=body) as response:
        async for chunk in response.content.iter_any():
            arrivals.append((time.monotonic(), chunk.count(b"data: ")))
    gaps = sorted(b[0] - a[0] for a, b in zip(arrivals, arrivals[1:]))
    return {"reads": len(arrivals), "events": sum(n for _, n in arrivals),
            "gap_p50_ms": round(1000 * gaps[len(gaps) // 2], 2) if gaps else None,
            "gap_p99_ms": round(1000 * gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))], 2) if gaps else None}


def median(values) -> float:
    return round(statistics.median(values), 4)


# ----- part 1 --------------------------------------------------------------------------------

async def part1(run: Run, http: aiohttp.ClientSession, cycles: int) -> dict:
    result: dict = {}
    vllm = "http://127.0.0.1:8000"
    proxy = "http://127.0.0.1:8080"
    run.start_engine("vllm-8b", "qwen3-8b-shape", 8000, 0.9)
    result["cold_start_s"] = round(await wait_ok(http, vllm + "/health", 420), 2)
    await complete(http, vllm, greedy(run.model))            # warm-up
    steady_direct = [(await complete(http, vllm, greedy(run.model)))[0] for _ in range(5)]
    baseline = (await complete(http, vllm, greedy(run.model)))[1]
    result["steady_request_direct_s"] = median(steady_direct)
    result["baseline_text"] = baseline
    result["memory_awake_nvidia_smi"] = run.nvidia_smi()
    # A burst of 100 to vLLM alone, awake: how many answers match the single-request output when
    # vLLM batches them (batch composition changes its numerics; this is the yardstick).
    answers = await asyncio.gather(*(complete(http, vllm, greedy(run.model)) for _ in range(100)))
    result["burst_100_direct_awake"] = {"identical_to_single_request": sum(t == baseline for _, t in answers)}

    # Each cycle, side by side from the same sleep level: autosleepd puts vLLM to sleep when idle;
    # vLLM alone is woken directly and asked once, then slept again directly; then the same
    # request goes through autosleepd, which wakes vLLM itself. (The probe interval is long, so
    # autosleepd does not notice the direct wake in between.)
    through: dict = {}
    for level in (1, 2):
        sidecar = run.start_sidecar(f"autosleepd-level{level}", 8000, 8080, idle_timeout="2s",
                                    sleep_level=level, probe_interval="1h",
                                    wake_check=run.wake_check)
        await wait_state(http, proxy, "awake", 30)
        steady = [(await complete(http, proxy, greedy(run.model)))[0] for _ in range(5)]
        alone, firsts, wakes, engine_wakes, same, readings = [], [], [], [], [], []
        for _ in range(cycles):
            asleep = await wait_state(http, proxy, "asleep", 60)
            readings.append({"nvidia_smi": run.nvidia_smi(),
                             "autosleepd_freed_bytes": asleep["gpu_memory_freed_bytes"],
                             "autosleepd_memory": asleep["memory"],
                             "autosleepd_sleep_s": asleep["last_sleep_seconds"]})
            started = time.monotonic()
            vllm_wake = await direct_wake(http, vllm, level)
            _, text = await complete(http, vllm, greedy(run.model))
            alone.append({"wake_s": round(vllm_wake, 3), "wake_plus_request_s": round(time.monotonic() - started, 3)})
            same.append(text == baseline)
            await post(http, vllm + f"/sleep?level={level}&mode=wait")
            latency, text = await complete(http, proxy, greedy(run.model))
            firsts.append(latency)
            woke = await status(http, proxy)
            wakes.append(woke["last_wake_seconds"])
            engine_wakes.append(woke["last_engine_wake_seconds"])
            same.append(text == baseline)
        alone_total = median(a["wake_plus_request_s"] for a in alone)
        # autosleepd's share: the first answer less the engine's own wake calls and a steady
        # request; for vLLM alone the same sum gives the client's share (near zero).
        shares = [f - e - median(steady) for f, e in zip(firsts, engine_wakes)]
        alone_shares = [a["wake_plus_request_s"] - a["wake_s"] - median(steady_direct) for a in alone]
        through[f"level{level}"] = {
            "steady_request_s": median(steady),
            "vllm_alone": alone,
            "first_answer_after_idle_sleep_s": [round(f, 3) for f in firsts],
            "autosleepd_wake_s": wakes,
            "engine_wake_calls_s": engine_wakes,
            "autosleepd_share_ms": [round(1000 * x, 1) for x in shares],
            "added_by_autosleepd_ms": round(1000 * (median(shares) - median(alone_shares)), 1),
            "interleaved_difference_ms": round(1000 * (median(firsts) - alone_total), 1),
            "ratio_to_vllm_alone": round(median(firsts) / alone_total, 3),
            "output_identical": all(same),
            "memory_asleep": readings[0],
        }
        if level == 1:
            # A burst of 100 while asleep: one wake, 100 answers.
            await wait_state(http, proxy, "asleep", 60)
            wakes_before = (await status(http, proxy))["wakes"]
            answers = await asyncio.gather(*(complete(http, proxy, greedy(run.model)) for _ in range(100)))
            after = await status(http, proxy)
            result["burst_100_through_autosleepd_asleep"] = {
                "wakes": after["wakes"] - wakes_before, "answered": len(answers),
                "identical_to_single_request": sum(text == baseline for _, text in answers),
                "slowest_s": round(max(t for t, _ in answers), 3)}
            # A stream, direct and through autosleepd (engine awake).
            body = greedy(run.model, tokens=128, stream=True)
            result["stream_direct"] = await stream_gaps(http, vllm, body)
            result["stream_through_autosleepd"] = await stream_gaps(http, proxy, body)
        sidecar.stop()
        run.processes.remove(sidecar)
    result["through_autosleepd"] = through
    result["requests_reaching_vllm_asleep"] = asleep_violations(run.out / "vllm-8b.log")
    run.stop_all()
    return result


def asleep_violations(log: Path) -> dict:
    """From vLLM's own log: requests received between a /sleep and the wake that followed."""
    text = log.read_text(errors="replace").splitlines()
    asleep, sleeps, violations, received = False, 0, 0, 0
    for line in text:
        if '"POST /sleep' in line:
            asleep, sleeps = True, sleeps + 1
        elif '"POST /wake_up' in line and "tags=weights" not in line:
            asleep = False   # awake again (a plain wake, or the kv_cache step of level 2)
        elif "Received request" in line:
            received += 1
            violations += asleep
    return {"sleeps_seen": sleeps, "requests_received": received, "received_while_asleep": violations,
            "checked": received > 0}


# ----- part 2 --------------------------------------------------------------------------------

async def part2(run: Run, http: aiohttp.ClientSession) -> dict:
    result: dict = {}
    coordination = tempfile.mkdtemp(prefix="autosleepd-coordination-")
    side_a, side_b = "http://127.0.0.1:8081", "http://127.0.0.1:8082"
    run.start_engine("vllm-a-8b", "qwen3-8b-shape", 8001, 0.6)
    result["cold_start_a_s"] = round(await wait_ok(http, "http://127.0.0.1:8001/health", 420), 2)
    run.start_sidecar("autosleepd-a", 8001, 8081, idle_timeout="0", coordination_dir=coordination,
                      instance="a")
    await wait_state(http, side_a, "awake", 30)
    await complete(http, side_a, greedy(run.model))
    await post(http, side_a + "/autosleepd/sleep")               # room for B to start
    result["a_asleep_nvidia_smi"] = run.nvidia_smi()
    run.start_engine("vllm-b-0.6b", "qwen3-0.6b-shape", 8002, 0.6, dummy=True)
    result["cold_start_b_s"] = round(await wait_ok(http, "http://127.0.0.1:8002/health", 420), 2)
    run.start_sidecar("autosleepd-b", 8002, 8082, idle_timeout="0", coordination_dir=coordination,
                      instance="b")
    await wait_state(http, side_b, "awake", 30)
    switches = []
    for name, base in [("A", side_a), ("B", side_b)] * 3:
        seconds, text = await complete(http, base, greedy(run.model))
        switches.append({"to": name, "seconds": round(seconds, 3), "answered": bool(text),
                         "nvidia_smi_used_mib": (run.nvidia_smi() or {}).get("used_mib")})
    statuses = {name: await status(http, base) for name, base in (("a", side_a), ("b", side_b))}
    logs = "".join(p.log.read_text(errors="replace") for p in run.processes if p.name.startswith("vllm"))
    to_a = [s["seconds"] for s in switches if s["to"] == "A"]
    result.update({
        "switches": switches,
        "all_answered": all(s["answered"] for s in switches),
        "switch_to_a_median_s": median(to_a),
        "cold_start_over_switch": round(result["cold_start_a_s"] / median(to_a), 1),
        "out_of_memory_in_vllm_logs": len(re.findall(r"out of memory", logs, re.IGNORECASE)),
        "wake_failures": sum(s["wake_failures"] for s in statuses.values()),
        "broken": [n for n, s in statuses.items() if s["state"] == "broken"],
        "evictions_done": sum(s.get("coordination", {}).get("evictions_done", 0) for s in statuses.values()),
        "memory_waits": sum(s["memory_waits"] for s in statuses.values()),
    })
    run.stop_all()
    return result


# ----- main ----------------------------------------------------------------------------------

def skip_reason(engine: str) -> str | None:
    if engine == "sim":
        return None
    if not shutil.which("nvidia-smi"):
        return "no GPU here (nvidia-smi not found)"
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "vLLM is not importable here (see README: Real GPU, real vLLM)"
    return None


async def main_async(args) -> int:
    reason = skip_reason(args.engine)
    if reason:
        print(f"gpu_e2e: skipped: {reason}")
        return 0
    run = Run(args)
    run.results["gpu"] = run.nvidia_smi()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=600)) as http:
            if args.part in ("1", "all"):
                run.results["part1"] = await part1(run, http, args.cycles)
            if args.part in ("2", "all"):
                run.results["part2"] = await part2(run, http)
    except Exception as error:
        run.results["error"] = repr(error)
        raise
    finally:
        run.stop_all()
        path = run.out / f"gpu-e2e-part{args.part}-{args.wake_check}.json"
        path.write_text(json.dumps(run.results, indent=2))
        print(json.dumps(run.results, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("vllm", "sim"), default="vllm")
    parser.add_argument("--part", choices=("1", "2", "all"), default="all")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--wake-check", choices=("request", "state"), default="request",
                        help="the sidecars' AUTOSLEEPD_WAKE_CHECK")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
