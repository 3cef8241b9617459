#!/usr/bin/env python3
"""autosleepd's memory probe (NVML through nvidia-ml-py, processes through psutil) on a real GPU.

A stand-in engine behaves as vLLM does with memory: a parent process (the API server) whose
child (the engine core) maps GPU memory with PyTorch, gives it back on "sleep" and maps it again
on "wake". A neighbour process then takes most of the GPU. autosleepd's own ``MemoryGuard``
reads all of it; nvidia-smi is read beside it.

    python3 bench/gpu_nvml_probe.py [--gib 20] [--out DIR]     # on the GPU machine
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autosleepd.config import Config  # noqa: E402
from autosleepd.gpu.guard import MemoryGuard  # noqa: E402
from autosleepd.gpu.readers import HostProcesses, open_nvml  # noqa: E402

CORE = """
import sys, torch
gib = float(sys.argv[1])
def take():
    return torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
weights = take()
print("awake", flush=True)
for line in sys.stdin:
    if line.strip() == "sleep":
        del weights
        torch.cuda.empty_cache()
        print("asleep", flush=True)
    elif line.strip() == "wake":
        weights = take()
        print("awake", flush=True)
    else:
        break
"""
API_SERVER = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]])"
NEIGHBOUR = """
import sys, time, torch
free, _ = torch.cuda.mem_get_info()
hold = torch.empty(free - int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda")
print("holding", flush=True)
sys.stdin.readline()
"""

GiB = 2**30


def smi() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return int(out.split()[0]) * 2**20


def said(process: subprocess.Popen, word: str) -> None:
    line = process.stdout.readline().strip()
    if line != word:
        raise RuntimeError(f"expected {word!r}, got {line!r}")


async def main(gib: float, out: Path) -> dict:
    reader = open_nvml()
    if reader is None:
        print("gpu_nvml_probe: skipped: NVML is not available here")
        return {}
    engine = subprocess.Popen([sys.executable, "-c", API_SERVER, CORE, str(gib)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    said(engine, "awake")
    config = dataclasses.replace(Config(), engine_pid=engine.pid, wake_memory_margin=GiB)
    guard = MemoryGuard(config, reader, HostProcesses())
    result: dict = {"gpu": None, "engine_pid": engine.pid}
    gpus, pids = await guard.read()
    mine = guard.engine_gpus(gpus, pids)
    result["gpu"] = {"index": mine[0].index, "uuid": mine[0].uuid, "total_bytes": mine[0].total}
    result["engine_pids_found"] = sorted(pids)
    result["nvml_processes"] = {str(pid): used for pid, used in mine[0].processes.items()}
    result["awake"] = {"engine_holds_bytes": guard.engine_holding(mine[0], pids),
                       "gpu_used_bytes_nvml": mine[0].used, "gpu_used_bytes_nvidia_smi": smi()}

    await guard.before_sleep()
    engine.stdin.write("sleep\n")
    engine.stdin.flush()
    said(engine, "asleep")
    freed = await guard.after_sleep(1)
    gpus, pids = await guard.read()
    gpu = next(g for g in gpus if g.uuid == mine[0].uuid)
    result["asleep"] = {"engine_holds_bytes": guard.engine_holding(gpu, pids),
                        "freed_bytes_by_autosleepd": freed, "gpu_used_bytes_nvml": gpu.used,
                        "gpu_used_bytes_nvidia_smi": smi(),
                        "wake_needs_bytes": guard.wake_needs(gpu, pids)}
    result["shortfall_with_room"] = (await guard.shortfall())

    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, "4"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    said(neighbour, "holding")
    shortfall = await guard.shortfall()
    result["neighbour_pid"] = neighbour.pid
    result["shortfall_with_neighbour"] = shortfall.describe() if shortfall else None
    result["shortfall_detail"] = shortfall.as_dict() if shortfall else None
    neighbour.stdin.write("\n")
    neighbour.stdin.flush()
    neighbour.wait()
    result["shortfall_after_neighbour_left"] = await guard.shortfall()

    engine.stdin.write("wake\n")
    engine.stdin.flush()
    said(engine, "awake")
    await guard.learn(awake=True)
    result["learned"] = guard.status()
    engine.stdin.write("exit\n")
    engine.stdin.flush()
    engine.wait()
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-nvml-probe.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=20.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    asyncio.run(main(args.gib, Path(args.out)))
