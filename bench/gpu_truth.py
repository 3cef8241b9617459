#!/usr/bin/env python3
"""Engine truth (issue 11) on real vLLM: what autosleepd does when the engine does not behave as
it believes.

    (a) behind   a direct POST /sleep to vLLM while traffic flows through autosleepd: each
                 request's latency, the slowest against the wake time (target: wake + 2 s); and,
                 first, whether a request that reached vLLM asleep completes after a later wake
    (b) slow     a level-2 wake slower than a short hold (AUTOSLEEPD_WAKE_TIMEOUT under the
                 measured reload): never broken, one reload_weights per wake, held clients' answers
    (c) apikey   vLLM with --api-key, autosleepd with AUTOSLEEPD_UPSTREAM_API_KEY: 5 sleep/wake
                 cycles served, never broken, the key in no log or status
    (d) fingerprint  AUTOSLEEPD_WAKE_CHECK=fingerprint over --cycles wakes per level: false alarms
                 (must be 0) and the cost of the first answer after a wake, against check=state
    (e) power    nvidia-smi power draw (median over --power-seconds) awake idle, asleep at level 1
                 and 2, and after vLLM exits

    python3 bench/gpu_truth.py                       # on the GPU machine (after shared/gpu-vllm)
    python3 bench/gpu_truth.py --engine sim --cycles 3   # the same steps against the simulator

One vLLM (--enforce-eager, real random weights, written by gen_weights.py when missing) serves
calibration, (e), (a), (b) and (d); a second one with --api-key serves (c). Each part writes
gpu-truth-ENGINE-PART.json into --out and reports pass or fail; a part that raises is recorded as
failed and the next one runs. A summary table ends the output. Skips itself (exit 0) where there
is no GPU or no vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_e2e import (MODELS, ROOT, Run, greedy, median, post, skip_reason,  # noqa: E402
                     status, wait_ok, wait_state)

from autosleepd.control.engine import EngineClient  # noqa: E402

VLLM, PROXY = "http://127.0.0.1:8000", "http://127.0.0.1:8080"
MODEL_DIR = "qwen3-8b-shape"
KEY = "sk-gpu-truth-4c1e77"   # the --api-key of part (c); it must show in no log or status
PARTS = ("a", "b", "c", "d", "e")


# ----- small helpers ---------------------------------------------------------------------------

async def timed(http, base: str, body: dict, timeout: float, headers=None) -> dict:
    """One completion; never raises: status, seconds, text, and the error code if any."""
    started = time.monotonic()
    try:
        async with http.post(base + "/v1/completions", json=body, headers=headers,
                             timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            answer = await response.json(content_type=None)
            outcome = {"status": response.status, "retry_after": response.headers.get("Retry-After")}
            if response.status == 200:
                outcome["text"] = answer["choices"][0]["text"]
            else:
                error = answer.get("error") if isinstance(answer, dict) else None
                outcome["code"] = error.get("code") if isinstance(error, dict) else error
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        outcome = {"status": None, "error": type(error).__name__}
    outcome["seconds"] = round(time.monotonic() - started, 3)
    return outcome


def power_draw(seconds: float) -> float | None:
    """Median GPU power draw in watts over ``seconds`` (nvidia-smi every 250 ms)."""
    if not shutil.which("nvidia-smi"):
        return None
    samples, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        out = subprocess.run(["nvidia-smi", "--query-gpu=power.draw", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.split()
        with contextlib.suppress(ValueError, IndexError):
            samples.append(float(out[0]))
        time.sleep(0.25)
    return round(statistics.median(samples), 1) if samples else None


async def engine_client(api_key: str | None = None) -> EngineClient:
    engine = EngineClient(VLLM, api_key=api_key)
    await engine.start()
    return engine


async def ensure_awake(engine: EngineClient) -> None:
    """Leave vLLM awake for the next part, whatever the last one did to it."""
    if await engine.is_sleeping():
        await engine.wake(await engine.sleep_level() or 2, timeout=300)


def reload_calls(run: Run, stats: dict | None) -> int:
    """reload_weights calls vLLM received so far: its access log, or the simulator's counts."""
    if stats is not None:
        return stats["calls"].get("/collective_rpc", 0)
    text = (run.out / "vllm.log").read_text(errors="replace")
    return len(re.findall(r'"POST /collective_rpc', text))


async def sim_stats(run: Run, http) -> dict | None:
    if run.engine != "sim":
        return None
    async with http.get(VLLM + "/sim/stats") as response:
        return await response.json()


@contextlib.asynccontextmanager
async def sidecar(run: Run, http, name: str, **settings):
    """autosleepd on :8080 for one part, stopped after it; autosleep off unless asked."""
    process = run.start_sidecar(name, 8000, 8080, **{"idle_timeout": "0", **settings})
    try:
        await wait_state(http, PROXY, "awake", 60)
        yield process
    finally:
        process.stop()
        run.processes.remove(process)


class BrokenWatch:
    """Polls status every 50 ms while a part runs: every state seen, and any broken_reason."""

    def __init__(self, http):
        self.http, self.states, self.reasons = http, set(), set()
        self._task: asyncio.Task | None = None

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, ValueError, KeyError):
                current = await status(self.http, PROXY)
                self.states.add(current["state"])
                if current.get("broken_reason"):
                    self.reasons.add(current["broken_reason"])
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> "BrokenWatch":
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    @property
    def broken(self) -> bool:
        return "broken" in self.states or bool(self.reasons)


# ----- calibration: vLLM alone ------------------------------------------------------------------

async def calibrate(run: Run, http, engine: EngineClient, args) -> dict:
    """Wake times, power asleep, and a request that reaches vLLM asleep (no sidecar running)."""
    result: dict = {"baseline_text": (await timed(http, VLLM, greedy(run.model), 60))["text"]}
    result["power_awake_idle_w"] = power_draw(args.power_seconds)
    await engine.sleep(1, timeout=300)             # the first level-1 sleep is the slow one
    result["power_asleep_level1_w"] = power_draw(args.power_seconds)
    stuck = asyncio.create_task(timed(http, VLLM, greedy(run.model), 120))
    await asyncio.sleep(args.asleep_wait)          # the request sits inside a sleeping vLLM
    result["asleep_request_answered_before_wake"] = stuck.done()
    started = time.monotonic()
    await engine.wake(1, timeout=300)
    result["wake_level1_s"] = round(time.monotonic() - started, 3)
    answer = await stuck
    result["asleep_request"] = {"status": answer["status"],
                                "completed_s_after_wake": round(time.monotonic() - started, 3),
                                "output_as_awake": answer.get("text") == result["baseline_text"]}
    await engine.sleep(2, timeout=300)
    result["power_asleep_level2_w"] = power_draw(args.power_seconds)
    steps: dict = {}
    await engine.wake(2, timeout=300, on_step=lambda name, s: steps.__setitem__(name, round(s, 3)))
    result["wake_level2_steps_s"] = steps
    result["wake_level2_s"] = round(sum(steps.values()), 3)
    return result


# ----- (a) slept behind autosleepd's back --------------------------------------------------------

async def part_a(run: Run, http, engine: EngineClient, cal: dict, args) -> dict:
    outcomes: list[dict] = []
    async with sidecar(run, http, "autosleepd-a", probe_interval="30s"):
        before = await status(http, PROXY)
        t0 = time.monotonic()

        async def client() -> None:
            while time.monotonic() - t0 < args.traffic_seconds:
                sent = time.monotonic() - t0
                outcome = await timed(http, PROXY, greedy(run.model), args.request_timeout)
                outcomes.append({"sent_at_s": round(sent, 3), **outcome})

        clients = [asyncio.create_task(client()) for _ in range(args.clients)]
        await asyncio.sleep(args.traffic_seconds / 4)
        slept_at = time.monotonic() - t0
        sleep_s = await post(http, VLLM + "/sleep?level=1&mode=wait")   # behind autosleepd's back
        await asyncio.gather(*clients)
        after = await status(http, PROXY)
    wake_s = cal["wake_level1_s"]
    slowest = max(o["seconds"] for o in outcomes)
    overlapping = [o for o in outcomes if o["sent_at_s"] <= slept_at + sleep_s <= o["sent_at_s"] + o["seconds"]]
    failed = [o for o in outcomes if o["status"] != 200]
    wrong = [o for o in outcomes if o["status"] == 200 and o["text"] != cal["baseline_text"]]
    return {
        "pass": not failed and slowest <= wake_s + 2.0,
        "requests": len(outcomes), "failed": len(failed), "failures": failed[:10],
        "answers_differing_from_baseline": len(wrong),
        "direct_sleep_at_s": round(slept_at, 3), "direct_sleep_call_s": round(sleep_s, 3),
        "wake_level1_alone_s": wake_s, "target_s": round(wake_s + 2.0, 3),
        "slowest_s": slowest, "median_s": median(o["seconds"] for o in outcomes),
        "stuck_on_the_sleep": [o["seconds"] for o in overlapping],
        "stuck_answered": all(o["status"] == 200 for o in overlapping),
        "autosleepd_wakes": after["wakes"] - before["wakes"],
        "autosleepd_last_wake_s": after.get("last_wake_seconds"),
        "states_at_end": after["state"],
        "latencies": [(o["sent_at_s"], o["seconds"], o["status"]) for o in outcomes],
    }


# ----- (b) a level-2 wake slower than the hold -------------------------------------------------

async def part_b(run: Run, http, engine: EngineClient, cal: dict, args) -> dict:
    reload_s = cal["wake_level2_steps_s"].get("reload_weights", 1.0)
    hold = round(max(0.3, min(1.0, reload_s / 2)), 2)   # below the reload: the wake outlasts it
    cycles, reloads_before = [], reload_calls(run, await sim_stats(run, http))
    async with sidecar(run, http, "autosleepd-b", sleep_level=2, wake_timeout=f"{hold}s"):
        before = await status(http, PROXY)
        async with BrokenWatch(http) as watch:
            for _ in range(args.slow_cycles):
                await post(http, PROXY + "/autosleepd/sleep?level=2")
                held = await asyncio.gather(*(timed(http, PROXY, greedy(run.model), 60)
                                              for _ in range(args.clients)))
                outcomes = [{k: o.get(k) for k in ("status", "code", "retry_after", "seconds")}
                            for o in held]
                try:   # the wake goes on after its clients gave up
                    awake = await wait_state(http, PROXY, "awake", round(10 + 5 * cal["wake_level2_s"]))
                except TimeoutError as error:
                    cycles.append({"held": outcomes, "request_after_wake": None, "error": str(error)})
                    break
                after_wake = await timed(http, PROXY, greedy(run.model), 60)
                cycles.append({"held": outcomes, "request_after_wake": after_wake["status"],
                               "wake_s": awake.get("last_wake_seconds")})
        after = await status(http, PROXY)
    reloads = reload_calls(run, await sim_stats(run, http)) - reloads_before
    wakes = after["wakes"] - before["wakes"]
    return {
        "pass": (not watch.broken and after["wake_failures"] == before["wake_failures"]
                 and reloads == wakes == args.slow_cycles
                 and all(c["request_after_wake"] == 200 for c in cycles)),
        "hold_timeout_s": hold, "reload_alone_s": reload_s, "wake_level2_alone_s": cal["wake_level2_s"],
        "states_seen": sorted(watch.states), "broken_reasons": sorted(watch.reasons),
        "wakes": wakes, "reload_weights_calls": reloads,
        "wake_failures": after["wake_failures"] - before["wake_failures"],
        "cycles": cycles,
    }


# ----- (c) vLLM with --api-key -------------------------------------------------------------------

async def part_c(run: Run, http, args) -> dict:
    authorized = {"Authorization": f"Bearer {KEY}"}
    answers = []
    async with sidecar(run, http, "autosleepd-c", upstream_api_key=KEY):
        before = await status(http, PROXY)
        async with BrokenWatch(http) as watch:
            for _ in range(5):
                await post(http, PROXY + "/autosleepd/sleep?level=1")
                answers.append(await timed(http, PROXY, greedy(run.model), 120, headers=authorized))
            keyless = await timed(http, PROXY, greedy(run.model), 60)   # clients keep their own auth
        after = await status(http, PROXY)
    log = (run.out / "autosleepd-c.log").read_text(errors="replace")
    leaks = log.count(KEY) + json.dumps(after).count(KEY)
    return {
        "pass": (all(a["status"] == 200 for a in answers) and not watch.broken and leaks == 0
                 and after["wakes"] - before["wakes"] == 5 and keyless["status"] == 401),
        "answers": [a["status"] for a in answers], "first_answer_s": [a["seconds"] for a in answers],
        "wakes": after["wakes"] - before["wakes"], "wake_failures": after["wake_failures"] - before["wake_failures"],
        "states_seen": sorted(watch.states), "broken_reasons": sorted(watch.reasons),
        "client_without_key_got": keyless["status"], "key_in_log_or_status": leaks,
        "last_error": after.get("last_error"),
    }


# ----- (d) the fingerprint check ----------------------------------------------------------------

async def wake_cycles(run: Run, http, level: int, cycles: int, baseline: str) -> list[dict]:
    rows = []
    for _ in range(cycles):
        await post(http, PROXY + f"/autosleepd/sleep?level={level}")
        answer = await timed(http, PROXY, greedy(run.model), 120)
        current = await status(http, PROXY)
        rows.append({"status": answer["status"], "first_answer_s": answer["seconds"],
                     "same_output": answer.get("text") == baseline,
                     "engine_wake_s": current.get("last_engine_wake_seconds"),
                     "state": current["state"]})
    return rows


async def part_d(run: Run, http, engine: EngineClient, cal: dict, args) -> dict:
    result: dict = {"levels": {}}
    runs: dict = {}
    for check, cycles in (("fingerprint", args.cycles), ("state", args.baseline_cycles)):
        async with sidecar(run, http, f"autosleepd-d-{check}", wake_check=check):
            before = await status(http, PROXY)
            async with BrokenWatch(http) as watch:
                rows = {level: await wake_cycles(run, http, level, cycles, cal["baseline_text"])
                        for level in (1, 2)}
            after = await status(http, PROXY)
        runs[check] = {"rows": rows, "broken": watch.broken, "broken_reasons": sorted(watch.reasons),
                       "wake_failures": after["wake_failures"] - before["wake_failures"],
                       "wakes": after["wakes"] - before["wakes"],
                       "check_keys": {k: v for k, v in after.items() if "fingerprint" in k}}
    finger = runs["fingerprint"]
    false_alarms = (finger["wake_failures"] + int(finger["broken"])
                    + sum(r["status"] != 200 for rows in finger["rows"].values() for r in rows))
    for level in (1, 2):
        with_check = [r["first_answer_s"] for r in finger["rows"][level]]
        without = [r["first_answer_s"] for r in runs["state"]["rows"][level]]
        result["levels"][f"level{level}"] = {
            "wakes_with_check": len(with_check),
            "first_answer_with_fingerprint_s": median(with_check),
            "first_answer_with_state_s": median(without),
            "cost_ms": round(1000 * (median(with_check) - median(without)), 1),
            "same_output_with_fingerprint": sum(r["same_output"] for r in finger["rows"][level]),
        }
    result.update({"pass": false_alarms == 0 and finger["wakes"] == 2 * args.cycles,
                   "false_alarms": false_alarms, "runs": runs})
    return result


# ----- main ------------------------------------------------------------------------------------

def ensure_weights() -> str | None:
    """Real random weights, which a level-2 wake reloads; written once (16 s on an H200)."""
    model = MODELS / MODEL_DIR
    if any(model.glob("*.safetensors")):
        return None
    subprocess.run([sys.executable, str(MODELS.parent / "gen_weights.py"), str(model)], check=True)
    return f"wrote weights into {model}"


async def guarded(results: dict, name: str, coroutine) -> None:
    started = time.monotonic()
    try:
        results[name] = await coroutine
    except Exception as error:   # one part's failure must not cost the others
        results[name] = {"pass": False, "error": f"{type(error).__name__}: {error}"}
    results[name]["part_seconds"] = round(time.monotonic() - started, 1)


async def main_async(args) -> int:
    reason = skip_reason(args.engine)
    if reason:
        print(f"gpu_truth: skipped: {reason}")
        return 0
    args.out = args.out or (str(ROOT / "bench" / "results" / "gpu") if args.engine == "vllm"
                            else tempfile.mkdtemp(prefix="gpu-truth-sim-"))
    run = Run(args)
    wanted = set(args.parts.split(","))
    results: dict = {"engine": args.engine, "gpu": run.nvidia_smi(), "started": run.results["started"]}
    eager = () if args.cuda_graphs else ("--enforce-eager",)
    timeout = aiohttp.ClientTimeout(total=600)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
            if wanted & {"a", "b", "d", "e"}:
                if args.engine == "vllm":
                    results["weights"] = ensure_weights()
                run.start_engine("vllm", MODEL_DIR, 8000, 0.9, vllm_args=eager)
                results["cold_start_s"] = round(await wait_ok(http, VLLM + "/health", 420), 2)
                engine = await engine_client()
                try:
                    await guarded(results, "calibration", calibrate(run, http, engine, args))
                    cal = results["calibration"]
                    for name, part in (("a", part_a), ("b", part_b), ("d", part_d)):
                        if name in wanted and "error" not in cal:
                            await ensure_awake(engine)
                            await guarded(results, name, part(run, http, engine, cal, args))
                finally:
                    await engine.close()
                run.stop_all()
                if "e" in wanted:
                    results["e"] = {k: cal.get(k) for k in ("power_awake_idle_w", "power_asleep_level1_w",
                                                            "power_asleep_level2_w")}
                    results["e"]["power_after_exit_w"] = power_draw(args.power_seconds)
                    measured = results["e"]["power_awake_idle_w"] is not None
                    results["e"]["pass"] = True if measured else None   # None: no nvidia-smi here
            if "c" in wanted:
                run.start_engine("vllm-api-key", MODEL_DIR, 8000, 0.9, api_key=KEY, vllm_args=eager)
                results["cold_start_api_key_s"] = round(await wait_ok(http, VLLM + "/health", 420), 2)
                await guarded(results, "c", part_c(run, http, args))
                run.stop_all()
    finally:
        run.stop_all()
        for name in ("calibration", *PARTS):
            if name in results:
                (run.out / f"gpu-truth-{args.engine}-{name}.json").write_text(
                    json.dumps({**results[name], "engine": args.engine, "gpu": results["gpu"]}, indent=2))
        (run.out / f"gpu-truth-{args.engine}.json").write_text(json.dumps(results, indent=2))
    print(summary(results))
    print(f"raw results: {run.out}")
    return 0 if all(results.get(p, {}).get("pass", True) is not False for p in PARTS) else 1


def summary(results: dict) -> str:
    def line(part: str, what: str, figures) -> str:
        entry = results.get(part)
        verdict = ("-" if entry is None else "n/a" if entry.get("pass", False) is None
                   else "pass" if entry.get("pass") else "FAIL")
        text = entry.get("error") if entry and "error" in entry else (figures(entry) if entry else "not run")
        return f"| {part} | {what} | {verdict} | {text} |"

    rows = [
        "| part | what | verdict | figures |", "|---|---|---|---|",
        line("a", "slept behind its back", lambda r: f"slowest {r['slowest_s']} s vs target "
             f"{r['target_s']} s; {r['failed']} of {r['requests']} failed; {r['autosleepd_wakes']} wake(s)"),
        line("b", "level-2 wake slower than the hold", lambda r: f"hold {r['hold_timeout_s']} s, reload "
             f"{r['reload_alone_s']} s; {r['wakes']} wakes, {r['reload_weights_calls']} reload_weights; "
             f"states {','.join(r['states_seen'])}"),
        line("c", "vLLM --api-key", lambda r: f"answers {r['answers']}; {r['wakes']} wakes; "
             f"keyless client {r['client_without_key_got']}; key leaks {r['key_in_log_or_status']}"),
        line("d", "fingerprint check", lambda r: f"false alarms {r['false_alarms']}; cost " + ", ".join(
             f"{k} {v['cost_ms']} ms ({v['wakes_with_check']} wakes)" for k, v in r["levels"].items())),
        line("e", "power draw", lambda r: f"awake {r['power_awake_idle_w']} W, L1 {r['power_asleep_level1_w']} W, "
             f"L2 {r['power_asleep_level2_w']} W, exited {r['power_after_exit_w']} W"),
    ]
    cal = results.get("calibration")
    if cal and "error" not in cal:
        rows.append(f"\ncalibration: level-1 wake {cal['wake_level1_s']} s, level-2 {cal['wake_level2_s']} s "
                    f"{cal['wake_level2_steps_s']}; a request sent to vLLM asleep: {cal['asleep_request']}")
    elif cal:
        rows.append(f"\ncalibration failed: {cal['error']}")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("vllm", "sim"), default="vllm")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of a,b,c,d,e")
    parser.add_argument("--cycles", type=int, default=10, help="(d) wakes per level with the fingerprint")
    parser.add_argument("--baseline-cycles", type=int, default=5, help="(d) wakes per level with check=state")
    parser.add_argument("--slow-cycles", type=int, default=3, help="(b) level-2 wakes")
    parser.add_argument("--clients", type=int, default=4, help="(a, b) concurrent clients")
    parser.add_argument("--traffic-seconds", type=float, default=8.0, help="(a) how long traffic flows")
    parser.add_argument("--request-timeout", type=float, default=15.0, help="(a) a client gives up after")
    parser.add_argument("--asleep-wait", type=float, default=3.0,
                        help="how long a request sits in a sleeping vLLM before the wake")
    parser.add_argument("--power-seconds", type=float, default=5.0)
    parser.add_argument("--cuda-graphs", action="store_true", help="start vLLM without --enforce-eager")
    parser.add_argument("--out", help="default: bench/results/gpu (vllm), a temporary folder (sim)")
    parser.set_defaults(wake_check=None)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
