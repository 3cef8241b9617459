#!/usr/bin/env python3
"""Two models on one GPU behind one autosleepd port: traffic A, B, A, B, ... where each switch
evicts the other engine (sleep) and wakes the one asked for, timed next to a cold start.

vLLM 0.26 serves the Qwen3-8B shape (A) and the Qwen3-0.6B shape (B) at
--gpu-memory-utilization 0.6 each: 0.6 + 0.6 > 1, so only one fits awake and autosleepd's memory
guard must put the other to sleep before each wake. One autosleepd process fronts both
(AUTOSLEEPD_ENGINES). A starts first, autosleepd learns its size awake and sleeps it, then B
starts in the room left (as engines coming up in turn under systemd would).

Checks (exit 0 only when all hold): every answer equals the model's first greedy answer; after
each switch the engine asked for is awake and the other asleep; no out-of-memory wake (vLLM's
logs, autosleepd's wake failures, no broken engine); no request reached a sleeping engine.

    python3 bench/gpu_one_port.py [--sleep-level 1|2] [--rounds 3]   # on the GPU machine
    python3 bench/gpu_one_port.py --sim                              # the simulator, here

vLLM mode needs vLLM importable and the shape models under $GPU_MODELS (default /tmp/w/models,
see /work/shared/gpu-vllm/README.md); real random weights are written when missing (a level-2
wake reloads them). The simulator mode runs the same flow in process, on a simulated 80 GiB GPU
that behaves as measured (a wake into too little memory makes a zombie). Writes JSON and a
markdown table to bench/results/gpu/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_e2e import MODELS, Process, asleep_violations, greedy, wait_ok  # noqa: E402

PORT = 8080
ENGINES = (("qwen3-8b", "qwen3-8b-shape"), ("qwen3-0.6b", "qwen3-0.6b-shape"))
UTILIZATION = 0.6


class VllmBackend:
    """Real vLLM servers and autosleepd as processes; their logs are the evidence."""

    name = "vllm"

    def __init__(self, out: Path):
        self.out = out
        self.processes: list[Process] = []
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        self.urls = {served: f"http://127.0.0.1:{8001 + i}" for i, (served, _) in enumerate(ENGINES)}
        self.port = PORT

    def prepare(self) -> list[str]:
        notes = []
        for _, shape in ENGINES:
            model = MODELS / shape
            if not any(model.glob("*.safetensors")):
                subprocess.run([sys.executable, str(MODELS.parent / "gen_weights.py"), str(model)], check=True)
                notes.append(f"wrote random weights into {model}")
        return notes

    async def start_engine(self, http, served: str, shape: str) -> float:
        port = int(self.urls[served].rsplit(":", 1)[1])
        command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(MODELS / shape),
                   "--served-model-name", served, "--enable-sleep-mode", "--host", "127.0.0.1",
                   "--port", str(port), "--gpu-memory-utilization", str(UTILIZATION),
                   "--max-model-len", "4096", "--enable-log-requests"]
        env = {**self.env, "VLLM_SERVER_DEV_MODE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0",
               "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        self.processes.append(Process(f"vllm-{served}", command, env, self.out / f"one-port-vllm-{served}.log"))
        return await wait_ok(http, f"http://127.0.0.1:{port}/health", 420)

    async def start_autosleepd(self, env: dict) -> str:
        self.processes.append(Process("autosleepd", [sys.executable, "-m", "autosleepd"],
                                      {**self.env, **env}, self.out / "one-port-autosleepd.log"))
        return f"http://127.0.0.1:{PORT}"

    def gpu_used_mib(self) -> int | None:
        if not shutil.which("nvidia-smi"):
            return None
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        return int(out.split()[0])

    def gpu(self) -> str | None:
        if not shutil.which("nvidia-smi"):
            return None
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip()

    def engine_evidence(self) -> dict:
        logs = {p.name: p.log for p in self.processes if p.name.startswith("vllm-")}
        text = "".join(log.read_text(errors="replace") for log in logs.values())
        return {"out_of_memory_lines": len(re.findall(r"out of memory", text, re.IGNORECASE)),
                "received_while_asleep": {n: asleep_violations(log) for n, log in logs.items()}}

    def asleep_requests(self, evidence: dict) -> int:
        return sum(v["received_while_asleep"] for v in evidence["received_while_asleep"].values())

    async def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()


class SimBackend:
    """Simulated engines on one simulated 80 GiB GPU, autosleepd in this process reading it."""

    name = "sim"
    SHAPES = {"qwen3-8b-shape": dict(weights=15.3, load=1.5), "qwen3-0.6b-shape": dict(weights=1.2, load=0.8)}

    def __init__(self, out: Path):
        from autosleepd.sim.gpu import GiB, SimGpu, SimProcesses
        self.GiB = GiB
        self.sim_gpu, self.sim_processes = SimGpu(total=80 * GiB), SimProcesses()
        self.server = None
        self.sims = {served: self._sim(served, shape) for served, shape in ENGINES}   # ports bound now
        self.urls = {served: sim.url for served, sim in self.sims.items()}
        self.port = 0

    def _sim(self, served: str, shape: str):
        from autosleepd.sim import SimSettings, SimulatedEngine
        size = self.SHAPES[shape]
        settings = SimSettings(model=served, load_seconds=size["load"], sleep_seconds=0.3,
                               wake_seconds=0.6, reload_seconds=size["weights"] / 8, token_seconds=0.005,
                               awake_bytes=int(UTILIZATION * 80 * self.GiB),
                               asleep_bytes=int(1.7 * self.GiB), weights_bytes=int(size["weights"] * self.GiB))
        return SimulatedEngine(settings, gpu=self.sim_gpu)

    def prepare(self) -> list[str]:
        return []

    async def start_engine(self, http, served: str, shape: str) -> float:
        sim = self.sims[served]
        started = time.monotonic()
        await sim.start()
        self.sim_processes.add(sim)
        return time.monotonic() - started

    async def start_autosleepd(self, env: dict) -> str:
        from autosleepd import log
        from autosleepd.config import Config
        from autosleepd.server import Autosleepd
        log.configure("warning", "json")
        self.server = Autosleepd(Config.from_env(env), gpu=self.sim_gpu, processes=self.sim_processes)
        await self.server.start()
        return self.server.url

    def gpu_used_mib(self) -> int:
        return self.sim_gpu.used // 2**20

    def gpu(self) -> str:
        return "simulated, 80 GiB"

    def engine_evidence(self) -> dict:
        sims = self.sims.values()
        return {"out_of_memory_lines": sum(s.stats.violations["wake_without_memory"] for s in sims),
                "zombies": [s.settings.model for s in sims if s.zombie],
                "received_while_asleep": {s.settings.model: s.stats.violations["request_while_asleep"]
                                          for s in sims}}

    def asleep_requests(self, evidence: dict) -> int:
        return sum(evidence["received_while_asleep"].values())

    async def close(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
        for sim in self.sims.values():
            await sim.close()


async def host_view(http, base: str) -> dict:
    async with http.get(base + "/autosleepd/host") as response:
        return {e["name"]: e for e in (await response.json())["engines"]}


async def wait_engine(http, base: str, name: str, state: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = (await host_view(http, base))[name]
            if seen["state"] == state:
                return seen
        except aiohttp.ClientConnectionError:
            pass   # autosleepd still starting
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{name} did not become {state} within {timeout:g}s (last: {seen and seen['state']})")


async def ask(http, base: str, model: str) -> tuple[float, str]:
    started = time.monotonic()
    async with http.post(base + "/v1/completions", json=greedy(model)) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{model}: {response.status} {answer}")
    return time.monotonic() - started, answer["choices"][0]["text"]


async def run(backend, args, http) -> dict:
    (a, shape_a), (b, shape_b) = ENGINES
    result: dict = {"engine": backend.name, "gpu": backend.gpu(), "sleep_level": args.sleep_level,
                    "rounds": args.rounds, "notes": backend.prepare(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result["cold_start_s"] = {a: round(await backend.start_engine(http, a, shape_a), 2)}
    base = await backend.start_autosleepd({
        "AUTOSLEEPD_ENGINES": ",".join(f"{name}={url}" for name, url in backend.urls.items()),
        "AUTOSLEEPD_HOST": "127.0.0.1", "AUTOSLEEPD_PORT": str(backend.port), "AUTOSLEEPD_IDLE_TIMEOUT": "0",
        "AUTOSLEEPD_SLEEP_LEVEL": str(args.sleep_level), "AUTOSLEEPD_WAKE_TIMEOUT": "300s",
        "AUTOSLEEPD_LOG_FORMAT": "json"})
    await wait_engine(http, base, a, "awake", 60)
    baseline = {a: (await ask(http, base, a))[1]}
    async with http.post(f"{base}/autosleepd/sleep?model={a}&level={args.sleep_level}") as response:
        assert response.status == 200, await response.text()   # room for B to start
    result["cold_start_s"][b] = round(await backend.start_engine(http, b, shape_b), 2)
    await wait_engine(http, base, b, "awake", 60)
    baseline[b] = (await ask(http, base, b))[1]
    switches = []
    for to, other in [(a, b), (b, a)] * args.rounds:
        seconds, text = await ask(http, base, to)
        view = await host_view(http, base)
        switches.append({"to": to, "seconds": round(seconds, 3), "correct": text == baseline[to],
                         "asked_awake": view[to]["state"] == "awake",
                         "other_asleep": view[other]["state"] == "asleep",
                         "gpu_used_mib": backend.gpu_used_mib()})
    view = await host_view(http, base)
    statuses = {}
    for name in (a, b):
        async with http.get(f"{base}/autosleepd/status?model={name}") as response:
            statuses[name] = await response.json()
    evidence = backend.engine_evidence()
    switch_s = {name: round(statistics.median(s["seconds"] for s in switches if s["to"] == name), 3)
                for name in (a, b)}
    result.update({
        "baseline_text": baseline, "switches": switches, "switch_median_s": switch_s,
        "cold_start_over_switch": {n: round(result["cold_start_s"][n] / switch_s[n], 1) for n in (a, b)},
        "host_view": view, "engine_evidence": evidence,
        "evictions_done": sum(s["coordination"]["evictions_done"] for s in statuses.values()),
        "wake_failures": sum(s["wake_failures"] for s in statuses.values()),
        "memory_waits": sum(s["memory_waits"] for s in statuses.values()),
    })
    result["checks"] = {
        "every_answer_correct": all(s["correct"] for s in switches),
        "each_switch_left_the_other_asleep": all(s["asked_awake"] and s["other_asleep"] for s in switches),
        "every_switch_evicted": result["evictions_done"] >= len(switches),
        "no_out_of_memory_wake": (evidence["out_of_memory_lines"] == 0 and result["wake_failures"] == 0
                                  and not evidence.get("zombies")
                                  and all(e["state"] != "broken" for e in view.values())),
        "nothing_reached_a_sleeping_engine": backend.asleep_requests(evidence) == 0,
    }
    result["pass"] = all(result["checks"].values())
    return result


def markdown(result: dict) -> str:
    (a, _), (b, _) = ENGINES
    lines = [f"# One port, two models on one GPU ({result['engine']}, {result['gpu']}, level {result['sleep_level']})",
             "", f"`python3 bench/gpu_one_port.py{' --sim' if result['engine'] == 'sim' else ''} "
                 f"--sleep-level {result['sleep_level']} --rounds {result['rounds']}`, {result['started']}",
             "", "| # | to | seconds (evict + wake + answer) | answer correct | other asleep | GPU used (MiB) |",
             "|---|---|---|---|---|---|"]
    for i, s in enumerate(result.get("switches", []), 1):
        lines.append(f"| {i} | {s['to']} | {s['seconds']} | {'yes' if s['correct'] else 'NO'} | "
                     f"{'yes' if s['other_asleep'] else 'NO'} | {s['gpu_used_mib']} |")
    if "switch_median_s" in result:
        lines += ["", "| model | cold start (s) | switch, median (s) | cold start / switch |", "|---|---|---|---|"]
        for name in (a, b):
            lines.append(f"| {name} | {result['cold_start_s'][name]} | {result['switch_median_s'][name]} | "
                         f"{result['cold_start_over_switch'][name]}x |")
    lines += ["", "| check | holds |", "|---|---|"]
    lines += [f"| {name.replace('_', ' ')} | {'yes' if ok else 'NO'} |" for name, ok in result.get("checks", {}).items()]
    if "error" in result:
        lines += ["", f"Failed: `{result['error']}`"]
    return "\n".join(lines) + "\n"


def cannot_run(sim: bool) -> str | None:
    if sim:
        return None
    if not shutil.which("nvidia-smi"):
        return "no GPU here (nvidia-smi not found); --sim runs the flow against the simulator"
    if subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode != 0:
        return "vLLM is not importable here (see /work/shared/gpu-vllm/README.md)"
    return None


async def main_async(args) -> int:
    reason = cannot_run(args.sim)
    if reason:
        print(f"gpu_one_port: cannot run: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = (SimBackend if args.sim else VllmBackend)(out)
    result: dict = {"engine": backend.name, "gpu": None, "sleep_level": args.sleep_level, "rounds": args.rounds,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            result = await run(backend, args, http)
    except Exception as error:
        result.update({"pass": False, "error": f"{type(error).__name__}: {error}"})
    finally:
        await backend.close()
        result["run_seconds"] = round(time.monotonic() - started, 1)
        stem = out / f"gpu-one-port-{backend.name}-level{args.sleep_level}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.json and .md")
    return 0 if result.get("pass") else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim", action="store_true", help="the simulator instead of vLLM (runs anywhere)")
    parser.add_argument("--sleep-level", type=int, choices=(1, 2), default=1)
    parser.add_argument("--rounds", type=int, default=3, help="A, B pairs of requests")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"))
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
