#!/usr/bin/env python3
"""Deep idle on a real GPU: power awake and idle, asleep at level 1 and 2, and with vLLM stopped
by autosleepd's stop rung; the first answer after each rung.

One vLLM 0.26 (Qwen3-8B shape, real random weights written by gen_weights.py when missing) behind
one autosleepd (run in this process) whose ladder ends with ``stop``: its start and stop commands
are this script's ``launch`` and ``kill`` subcommands, which start vLLM in its own session (pid
file) and end it. The GPU's draw is read through NVML (autosleepd's own reader) every 250 ms,
median over ``--power-seconds``, with no vLLM process first, then awake and idle, asleep at level
1, asleep at level 2, and stopped. Each rung is reached by idling from the last request; then one
request is timed through autosleepd (its wake, or its cold start). autosleepd's own power
accounting (energy per state, the saving) is read from its status at the end.

With ``--sim`` the engine is the simulator on a simulated GPU (which draws per engine state), in
this process, stopped and started by curl commands through its launcher (``autosleepd.sim.launcher``).

    python3 bench/gpu_deep_idle.py --out bench/results/gpu        # on the GPU machine (README)
    python3 bench/gpu_deep_idle.py --sim --out DIR                # the same flow, the simulator

It writes gpu-deep-idle-{vllm|sim}.json and .md into --out, and exits 0 only when every check
holds. It skips itself with a message, exit 0, where no GPU or no vLLM is found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_e2e import MODELS, ROOT, complete, greedy, skip_reason, status, wait_ok  # noqa: E402

MODEL_DIR = "qwen3-8b-shape"
ENGINE_PORT, PROXY_PORT = 8000, 8080
BUDGET = 530.0   # seconds: the whole run stays under 9 minutes
# Idle seconds to each rung; a rung's power is read once it is reached, before the next one.
# The first rung leaves autosleepd over 10 idle seconds awake, to learn the awake-idle draw.
LADDERS = {"vllm": (25, 60, 95), "sim": (18, 22, 26)}


# ----- the engine's start and stop commands ------------------------------------------------------

def engine_command(eager: bool) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(MODELS / MODEL_DIR),
               "--served-model-name", "m", "--enable-sleep-mode", "--host", "127.0.0.1",
               "--port", str(ENGINE_PORT), "--gpu-memory-utilization", "0.9", "--max-model-len", "4096"]
    return command + (["--enforce-eager"] if eager else [])


def launch(args) -> int:
    """The start command: the engine in its own session, its pid in the pid file; returns at once."""
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(args.log, "a") as log:
        process = subprocess.Popen(engine_command(not args.cuda_graphs), env=env,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    Path(args.pidfile).write_text(str(process.pid))
    print(f"launched the engine, pid {process.pid}")
    return 0


def kill(args) -> int:
    """The stop command: SIGTERM to the engine's session, SIGKILL after 60 s; returns once gone."""
    try:
        pid = int(Path(args.pidfile).read_text())
    except (OSError, ValueError):
        print("no engine pid file: nothing to stop")
        return 0
    for sig, wait in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive(pid):
            break
    Path(args.pidfile).unlink(missing_ok=True)
    print(f"stopped the engine, pid {pid}")
    return 0


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (its parent, the launcher, is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ----- readings ----------------------------------------------------------------------------------

def read_power(reader, seconds: float) -> float | None:
    """Median draw of GPU 0 over ``seconds``, read every 250 ms (NVML, or the simulated GPU)."""
    if reader is None:
        return None
    draws, deadline = [], time.monotonic() + seconds
    while True:
        watts = reader.read()[0].power_watts
        if watts is not None:
            draws.append(watts)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    return round(statistics.median(draws), 1) if draws else None


async def wait_for(http, base: str, predicate, what: str, timeout: float) -> dict:
    deadline, current = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        current = await status(http, base)
        if predicate(current):
            return current
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{what} not reached within {timeout:g}s (state: {current.get('state')})")


def engine_gone() -> bool:
    import socket
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", ENGINE_PORT)) != 0


# ----- the engine --------------------------------------------------------------------------------

class VllmEngine:
    """vLLM in its own session, started and stopped by this script's launch and kill commands."""

    def __init__(self, args, out: Path):
        from autosleepd.gpu.readers import open_nvml
        me = shlex.join([sys.executable, str(Path(__file__).resolve())])
        flags = (f"--pidfile {shlex.quote(str(out / 'deep-idle-vllm-engine.pid'))} "
                 f"--log {shlex.quote(str(out / 'deep-idle-vllm-engine.log'))}"
                 + (" --cuda-graphs" if args.cuda_graphs else ""))
        self.start_command, self.stop_command = f"{me} launch {flags}", f"{me} kill {flags}"
        self.reader = open_nvml()
        self.gpu = self.processes = None   # autosleepd reads NVML and the host's processes

    async def start(self) -> None:
        await asyncio.to_thread(subprocess.run, shlex.split(self.start_command), check=True)

    async def stop(self) -> None:
        await asyncio.to_thread(subprocess.run, shlex.split(self.stop_command))


class SimEngine:
    """The simulator on a simulated GPU, stopped and started through its launcher (curl)."""

    def __init__(self):
        from autosleepd.sim import SimSettings, SimulatedEngine
        from autosleepd.sim.gpu import SimGpu, SimProcesses
        self.gpu = self.reader = SimGpu()
        self.engine = SimulatedEngine(SimSettings(model="m", load_seconds=1.0, sleep_seconds=0.3,
                                                  wake_seconds=0.6, reload_seconds=1.0,
                                                  token_seconds=0.01), port=ENGINE_PORT, gpu=self.gpu)
        self.processes = SimProcesses(self.engine)
        self.launcher = None

    async def start(self) -> None:
        from autosleepd.sim.launcher import Launcher
        self.launcher = Launcher(self.engine)
        await self.launcher.open()
        self.start_command, self.stop_command = self.launcher.command("start"), self.launcher.command("stop")
        await self.engine.start()

    async def stop(self) -> None:
        if self.launcher is not None:
            await self.launcher.close()


# ----- the run -----------------------------------------------------------------------------------

async def measure(args, out: Path, result: dict) -> None:
    """Fills ``result`` as it goes, so a failure keeps what was measured before it."""
    from autosleepd import log
    from autosleepd.config import Config
    from autosleepd.server import Autosleepd

    started = time.monotonic()
    mode = "sim" if args.sim else "vllm"
    rungs = LADDERS[mode]
    engine = SimEngine() if args.sim else VllmEngine(args, out)
    log_file = open(out / f"deep-idle-{mode}-autosleepd.log", "w")
    log.configure("info", "json", log_file)   # transitions, commands, level_chosen
    result.update({"mode": mode, "ladder_idle_s": rungs, "power_seconds": args.power_seconds,
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    result["power_no_engine_w"] = await asyncio.to_thread(read_power, engine.reader, args.power_seconds)
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    sidecar = None
    await engine.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=400)) as http:
            result["first_cold_start_s"] = round(
                await wait_ok(http, f"http://127.0.0.1:{ENGINE_PORT}/health", 300), 2)
            config = Config.from_env({
                "AUTOSLEEPD_UPSTREAM": f"http://127.0.0.1:{ENGINE_PORT}", "AUTOSLEEPD_HOST": "127.0.0.1",
                "AUTOSLEEPD_PORT": str(PROXY_PORT),
                "AUTOSLEEPD_LADDER": f"{rungs[0]}s:1,{rungs[1]}s:2,{rungs[2]}s:stop",
                "AUTOSLEEPD_ENGINE_STOP_COMMAND": engine.stop_command,
                "AUTOSLEEPD_ENGINE_START_COMMAND": engine.start_command,
                "AUTOSLEEPD_WAKE_TIMEOUT": "300s", "AUTOSLEEPD_ENGINE_START_TIMEOUT": "300s",
                "AUTOSLEEPD_PROBE_INTERVAL": "1h"})
            sidecar = Autosleepd(config, gpu=engine.gpu, processes=engine.processes)
            await sidecar.start()
            await wait_for(http, proxy, lambda s: s["state"] == "awake", "awake", 60)
            await complete(http, proxy, greedy("m"))                   # warm-up
            steady, baseline = await complete(http, proxy, greedy("m"))
            result["steady_request_s"] = round(steady, 3)
            result["power_awake_idle_w"] = await asyncio.to_thread(read_power, engine.reader,
                                                                   args.power_seconds)
            answers, rows = [], []
            for rung, (name, reached) in enumerate((
                    ("asleep level 1", lambda s: s["state"] == "asleep" and s["sleep_level"] == 1),
                    ("asleep level 2", lambda s: s["state"] == "asleep" and s["sleep_level"] == 2),
                    ("stopped", lambda s: s["state"] == "stopped"))):
                left = BUDGET - (time.monotonic() - started)
                await wait_for(http, proxy, reached, name, min(left, rungs[rung] + 120))
                if name == "stopped":
                    result["engine_port_refuses_when_stopped"] = engine_gone()
                    await asyncio.sleep(args.settle)              # the board's draw settles
                draw = await asyncio.to_thread(read_power, engine.reader, args.power_seconds)
                latency, text = await complete(http, proxy, greedy("m"))
                answers.append(text)
                after = await status(http, proxy)
                rows.append({"rung": name, "power_w": draw, "first_answer_s": round(latency, 3),
                             "wake_s": after["last_wake_seconds"] if name != "stopped"
                             else after["last_start_seconds"]})
            result["rungs"] = rows
            final = await status(http, proxy)
            result["autosleepd"] = {key: final.get(key) for key in (
                "stops", "starts", "stop_failures", "start_failures", "last_stop_seconds",
                "last_start_seconds", "sleeps", "wakes", "ladder_steps", "power")}
            result["output_identical"] = all(text == baseline for text in answers)
    finally:
        if sidecar is not None:
            await sidecar.shutdown()
        await engine.stop()
        log_file.close()
        result["seconds"] = round(time.monotonic() - started, 1)


def checks(result: dict) -> dict:
    rows = {row["rung"]: row for row in result.get("rungs", [])}
    auto = result.get("autosleepd") or {}
    found = {
        "every_rung_reached_and_answered": len(rows) == 3,
        "output_identical_after_every_rung": result.get("output_identical") is True,
        "engine_process_gone_when_stopped": result.get("engine_port_refuses_when_stopped") is True,
        "one_stop_one_start": auto.get("stops") == 1 and auto.get("starts") == 1
                              and not auto.get("start_failures") and not auto.get("stop_failures"),
        "under_9_minutes": result.get("seconds", 1e9) < 540,
    }
    if result.get("power_no_engine_w") is not None:   # NVML here, or the simulated GPU
        stopped, level1 = rows.get("stopped", {}).get("power_w"), rows.get("asleep level 1", {}).get("power_w")
        found["power_read_at_every_rung"] = all(row.get("power_w") is not None for row in rows.values())
        found["stopped_draws_less_than_asleep"] = (stopped is not None and level1 is not None
                                                   and stopped < level1)
        power = auto.get("power") or {}
        found["autosleepd_measured_power"] = bool(power.get("energy_wh"))
        found["autosleepd_learned_the_awake_idle_draw"] = power.get("awake_idle_watts") is not None
    return found


def markdown(result: dict) -> str:
    lines = [f"# Deep idle ({result['mode']}, {result.get('started')})", "",
             f"Ladder idle seconds to level 1, level 2, stop: {result['ladder_idle_s']}; power: "
             "median of GPU power readings (NVML, or the simulated GPU) over "
             f"{result['power_seconds']:g} s.", "",
             "| engine state | GPU power (W) | first answer after it (s) | of which wake or start (s) |",
             "|---|---|---|---|",
             f"| no vLLM process | {result.get('power_no_engine_w')} | | |",
             f"| awake, idle | {result.get('power_awake_idle_w')} | {result.get('steady_request_s')} | |"]
    for row in result.get("rungs", []):
        lines.append(f"| {row['rung']} | {row['power_w']} | {row['first_answer_s']} | {row['wake_s']} |")
    power = (result.get("autosleepd") or {}).get("power") or {}
    lines += ["", f"First cold start: {result.get('first_cold_start_s')} s. autosleepd's own accounting: "
              f"energy {power.get('energy_wh')} Wh by state, saved {power.get('saved_wh')} Wh, awake-idle "
              f"draw learned {power.get('awake_idle_watts')} W.", "",
              "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in result["checks"].items())]
    return "\n".join(lines) + "\n"


def ensure_weights() -> None:
    """Real random weights, which a level-2 wake reloads; written once (16 s on an H200)."""
    model = MODELS / MODEL_DIR
    if not any(model.glob("*.safetensors")):
        subprocess.run([sys.executable, str(MODELS.parent / "gen_weights.py"), str(model)], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", choices=("measure", "launch", "kill"), default="measure")
    parser.add_argument("--sim", action="store_true", help="the simulator instead of vLLM")
    parser.add_argument("--cuda-graphs", action="store_true", help="start vLLM without --enforce-eager")
    parser.add_argument("--power-seconds", type=float, default=8.0)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before reading a stopped GPU")
    parser.add_argument("--pidfile")
    parser.add_argument("--log")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"))
    args = parser.parse_args()
    if args.action == "launch":
        return launch(args)
    if args.action == "kill":
        return kill(args)
    reason = skip_reason("sim" if args.sim else "vllm")
    if reason:
        print(f"gpu_deep_idle: skipped: {reason}")
        return 0
    if args.sim:
        args.power_seconds, args.settle = 0.5, 0.0
    else:
        ensure_weights()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"mode": "sim" if args.sim else "vllm"}
    try:
        asyncio.run(measure(args, out, result))
    except Exception as error:
        result["error"] = repr(error)
    result["checks"] = checks(result)
    name = f"gpu-deep-idle-{result['mode']}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(markdown({"ladder_idle_s": LADDERS[result["mode"]],
                                              "power_seconds": args.power_seconds, **result}))
    print(json.dumps(result, indent=2))
    return 0 if "error" not in result and all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
