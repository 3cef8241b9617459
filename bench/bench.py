#!/usr/bin/env python3
"""What autosleepd costs per request, measured side by side in one run.

1. Plain proxying: the simulator (immediate small completions) reached directly, through
   autosleepd (uvloop and asyncio event loops), and through nginx (a plain reverse proxy,
   buffering off), loaded by wrk at concurrency 1, 16 and 64.
2. Streaming: 200 tokens at 10 ms, the gaps between chunks as the client sees them.
3. The wake path: bursts of 1, 100 and 1000 requests into a sleeping engine.
4. Footprint: autosleepd's memory and CPU idle for 60 s and under the load of item 1.
5. The data path against its goals (run first): CPU per request and per streamed event, the
   latency added at one connection, the time to first event of 256 concurrent streams, for
   direct, nginx and autosleepd (and, with --baseline REF, autosleepd as of a git commit), in
   interleaved rounds; the goals printed as met or not.

Writes bench/results/bench.json, bench/results/bench.md, bench/results/data_path.md and
bench/results/latency.png.

    make bench            (or: .venv/bin/python bench/bench.py [--quick] [--baseline REF]
                           [--only-data-path])
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BODY = '{"model": "sim-model", "prompt": "hello world", "max_tokens": 4}'
PERCENTILES = [50, 75, 90, 95, 99, 99.9]
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local out = {}
  for _, p in ipairs({%s}) do
    table.insert(out, string.format('"%%s": %%d', tostring(p), latency:percentile(p)))
  end
  local curve = {}
  for i = 1, 99 do table.insert(curve, tostring(latency:percentile(i))) end
  table.insert(curve, tostring(latency:percentile(99.9)))
  io.write(string.format('WRK {"requests": %%d, "duration_us": %%d, "errors": %%d, "status_errors": %%d, "percentiles_us": {%%s}, "curve_us": [%%s]}\\n',
    summary.requests, summary.duration, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, table.concat(out, ", "), table.concat(curve, ", ")))
end
""" % (BODY, ", ".join(str(p) for p in PERCENTILES))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Services:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str], env: dict | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("w")
        process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def start_sim(services: Services, *args: str) -> str:
    port = free_port()
    services.start(f"sim-{port}", [sys.executable, "-m", "autosleepd", "sim", "--port", str(port), *args])
    wait_listening(port)
    return f"http://127.0.0.1:{port}"


def start_autosleepd(services: Services, upstream: str, loop: str, tree: Path | None = None,
                     **settings) -> tuple[str, int]:
    """``tree``: another version's source (see ``baseline_tree``), run instead of this one.
    Autosleep is on, as by default, with a window longer than any run here."""
    port = free_port()
    env = {"AUTOSLEEPD_UPSTREAM": upstream, "AUTOSLEEPD_HOST": "127.0.0.1", "AUTOSLEEPD_PORT": str(port),
           "AUTOSLEEPD_IDLE_TIMEOUT": "10m", "AUTOSLEEPD_LOG_FORMAT": "json", "AUTOSLEEPD_EVENT_LOOP": loop,
           **{f"AUTOSLEEPD_{k.upper()}": str(v) for k, v in settings.items()}}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    process = services.start(f"autosleepd-{loop}-{port}", [sys.executable, "-m", "autosleepd"], env,
                             cwd=tree)
    wait_listening(port)
    return f"http://127.0.0.1:{port}", process.pid


def baseline_tree(ref: str, workdir: Path) -> Path:
    """autosleepd's package as of git ``ref``, to run side by side with this one."""
    tree = workdir / "baseline"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "autosleepd"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def nginx_available() -> str | None:
    if shutil.which("nginx"):
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], capture_output=True)
        if shutil.which("nginx"):
            return None
    return "nginx is not installed and could not be installed (apt-get install nginx-light)"


def start_nginx(services: Services, upstream: str) -> str:
    port = free_port()
    conf = services.workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {services.workdir}/nginx.pid;
error_log {services.workdir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {services.workdir};
  proxy_temp_path {services.workdir};
  upstream engine {{ server {upstream.split('//')[1]}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
""")
    services.start("nginx", ["nginx", "-c", str(conf), "-p", str(services.workdir)])
    wait_listening(port)
    return f"http://127.0.0.1:{port}"


def wrk(url: str, connections: int, seconds: int, script: Path) -> dict:
    threads = 1 if connections == 1 else 2
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                          "-s", str(script), url + "/v1/completions"],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    line = next(l for l in out.splitlines() if l.startswith("WRK "))
    data = json.loads(line[4:])
    data["rps"] = round(data["requests"] / (data["duration_us"] / 1e6), 1)
    return data


# ----- 1. plain proxying ---------------------------------------------------------------------

def proxying(services: Services, seconds: int, autosleepd_pids: dict) -> dict:
    script = services.workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    sim = start_sim(services)
    targets = {"direct": sim}
    for loop in ("uvloop", "asyncio"):
        url, pid = start_autosleepd(services, sim, loop)
        targets[f"autosleepd ({loop})"] = url
        autosleepd_pids[loop] = pid
    skipped = nginx_available()
    if skipped is None:
        targets["nginx"] = start_nginx(services, sim)
    results: dict = {"nginx_skipped": skipped, "runs": {}}
    for connections in (1, 16, 64):
        for name, url in targets.items():
            wrk(url, connections, 2, script)   # warm-up
            pid = autosleepd_pids.get(name[len("autosleepd ("):-1]) if name.startswith("autosleepd") else None
            before = psutil.Process(pid).cpu_times() if pid else None
            run = wrk(url, connections, seconds, script)
            if pid:
                after = psutil.Process(pid)
                cpu = (sum(after.cpu_times()[:2]) - sum(before[:2])) / seconds
                run["autosleepd_cpu_cores"] = round(cpu, 3)
                run["autosleepd_rss_mib"] = round(after.memory_info().rss / 2**20, 1)
            results["runs"][f"{name} c={connections}"] = run
            print(f"  {name:22} c={connections:<3} {run['rps']:>9.1f} rps  p50 {run['percentiles_us']['50'] / 1000:.3f} ms"
                  f"  p99 {run['percentiles_us']['99'] / 1000:.3f} ms", flush=True)
    return results


# ----- 2. streaming ---------------------------------------------------------------------------

async def stream_gaps(http, url: str, streams: int) -> dict:
    body = {"model": "sim-model", "prompt": "stream me", "max_tokens": 200, "stream": True}
    gaps, coalesced, events = [], 0, 0
    for _ in range(streams):
        last = None
        async with http.post(url + "/v1/completions", json=body) as response:
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                count = chunk.count(b"data: ")
                events += count
                coalesced += count > 1
                if last is not None:
                    gaps.append(now - last)
                last = now
    gaps.sort()
    return {"events": events, "reads_with_several_events": coalesced,
            "gap_p50_ms": round(1000 * gaps[len(gaps) // 2], 3),
            "gap_p99_ms": round(1000 * gaps[int(len(gaps) * 0.99)], 3),
            "gap_max_ms": round(1000 * gaps[-1], 3)}


async def streaming(services: Services, streams: int) -> dict:
    sim = start_sim(services, "--token", "10ms")
    proxy, _ = start_autosleepd(services, sim, "auto")
    async with aiohttp.ClientSession() as http:
        direct = await stream_gaps(http, sim, streams)
        through = await stream_gaps(http, proxy, streams)
    return {"direct": direct, "autosleepd": through,
            "added_p99_gap_ms": round(through["gap_p99_ms"] - direct["gap_p99_ms"], 3)}


# ----- 3. the wake path -----------------------------------------------------------------------

async def wake_path(services: Services) -> dict:
    sim = start_sim(services, "--wake", "300ms")
    proxy, _ = start_autosleepd(services, sim, "auto", max_queue=2000)
    body = {"model": "sim-model", "prompt": "hello world", "max_tokens": 4}
    results = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def status():
            async with http.get(proxy + "/autosleepd/status") as response:
                return await response.json()

        async def timed(started: float, base: str = proxy) -> float:
            async with http.post(base + "/v1/completions", json=body) as response:
                first_byte = time.perf_counter() - started   # headers come with the body here
                await response.read()
                assert response.status == 200, response.status
            return first_byte

        while (await status())["state"] != "awake":
            await asyncio.sleep(0.05)
        steady = statistics.median([await timed(time.perf_counter()) for _ in range(50)])
        for burst in (1, 100, 1000):
            # The same burst straight to the awake engine: what the client and the engine take.
            started = time.perf_counter()
            direct = await asyncio.gather(*(timed(started, sim) for _ in range(burst)))
            async with http.post(proxy + "/autosleepd/sleep") as response:
                assert response.status == 200
            wakes = (await status())["wakes"]
            started = time.perf_counter()
            firsts = await asyncio.gather(*(timed(started) for _ in range(burst)))
            after = await status()
            engine = after["last_engine_wake_seconds"]
            results[f"burst {burst}"] = {
                "wakes": after["wakes"] - wakes,
                "engine_wake_ms": round(1000 * engine, 2),
                "direct_awake_first_ms": round(1000 * min(direct), 2),
                "direct_awake_last_ms": round(1000 * max(direct), 2),
                "first_ttfb_ms": round(1000 * min(firsts), 2),
                "last_ttfb_ms": round(1000 * max(firsts), 2),
                # TTFB through autosleepd into a sleeping engine, less the engine's wake and
                # less the same request's TTFB in the same burst sent straight to the awake engine
                "proxy_share_first_ms": round(1000 * (min(firsts) - engine - min(direct)), 2),
                "proxy_share_last_ms": round(1000 * (max(firsts) - engine - max(direct)), 2),
            }
            print(f"  burst {burst:>4}: {results[f'burst {burst}']}", flush=True)
    return {"steady_request_ms": round(1000 * steady, 3), "bursts": results}


# ----- 4. footprint ---------------------------------------------------------------------------

def idle_footprint(services: Services, seconds: int) -> dict:
    sim = start_sim(services)
    _, pid = start_autosleepd(services, sim, "auto", idle_timeout="5m")
    time.sleep(2)   # started and settled
    process = psutil.Process(pid)
    before = sum(process.cpu_times()[:2])
    time.sleep(seconds)   # the measurement itself: autosleepd left alone
    used = sum(process.cpu_times()[:2]) - before
    return {"seconds": seconds, "rss_mib": round(process.memory_info().rss / 2**20, 1),
            "cpu_percent_of_a_core": round(100 * used / seconds, 3)}


# ----- 5. the data path, against the goals ----------------------------------------------------

# Goals (issue 14), each a figure measured side by side with direct and nginx in the same run.
GOALS = {"cpu_per_request_us": 100, "added_p50_c1_ms": 0.1, "cpu_per_event_us": 15,
         "ttft_p50_added_ms": 2.0}


def cpu_seconds(pid: int) -> float:
    """A process and its children (nginx's workers), user and system."""
    process = psutil.Process(pid)
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        times = each.cpu_times()
        total += times.user + times.system
    return total


def stream_load(url: str, seconds: float, connections: int = 256, max_tokens: int = 50) -> dict:
    """bench/streams.py in its own process: the load generator shares no loop with anyone."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "streams.py"), url, "--connections",
                          str(connections), "--seconds", str(seconds), "--max-tokens", str(max_tokens)],
                         capture_output=True, text=True, timeout=seconds + 120).stdout
    return json.loads(next(l for l in out.splitlines() if l.startswith("STREAMS "))[8:])


def data_path(services: Services, rounds: int, seconds: int, baseline: Path | None,
              baseline_ref: str | None) -> dict:
    """Per request and per streamed event: the CPU autosleepd and nginx spend, the latency they
    add at one connection, and the time to first event of 256 concurrent streams; in
    interleaved rounds (each target in turn, the same loads), medians reported."""
    script = services.workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    skipped = nginx_available()
    # plain: answers at once; stream: a token every 20 ms, 256 streams offer ~12.8k events/s,
    # about what the simulator can send on 2 cores (CPU per event); ttft: a token every 50 ms,
    # ~5k events/s, so the time to first event is not a saturated simulator's queue.
    sims = {"plain": start_sim(services), "stream": start_sim(services, "--token", "20ms"),
            "ttft": start_sim(services, "--token", "50ms")}
    targets: dict[str, dict] = {"direct": dict(sims)}
    if skipped is None:
        for key, sim in sims.items():
            before = {p.pid for p in services.processes}
            url = start_nginx(services, sim)
            pid = next(p.pid for p in services.processes if p.pid not in before)
            targets.setdefault("nginx", {})[key] = url
            targets["nginx"][key + "_pid"] = pid
    versions = [("autosleepd", None)]
    if baseline is not None:
        versions.append((f"autosleepd {baseline_ref}", baseline))
    for name, tree in versions:
        for key, sim in sims.items():
            url, pid = start_autosleepd(services, sim, "auto", tree=tree)
            targets.setdefault(name, {})[key] = url
            targets[name][key + "_pid"] = pid
    samples: dict = {name: {"p50_c1_us": [], "cpu_per_request_us": [], "rps_c16": [],
                            "cpu_per_event_us": [], "coalesced_share": [],
                            "token_coalesced_share": [], "events_per_s": [],
                            "ttft_p50_ms": []} for name in targets}
    for round_ in range(rounds):
        for name, target in targets.items():
            wrk(target["plain"], 1, 1, script)   # warm-up
            run = wrk(target["plain"], 1, seconds, script)
            samples[name]["p50_c1_us"].append(run["percentiles_us"]["50"])
            pid = target.get("plain_pid")
            before = cpu_seconds(pid) if pid else 0.0
            run = wrk(target["plain"], 16, seconds, script)
            samples[name]["rps_c16"].append(run["rps"])
            if pid:
                samples[name]["cpu_per_request_us"].append(1e6 * (cpu_seconds(pid) - before) / run["requests"])
            pid = target.get("stream_pid")
            before = cpu_seconds(pid) if pid else 0.0
            load = stream_load(target["stream"], seconds)
            if pid:
                samples[name]["cpu_per_event_us"].append(1e6 * (cpu_seconds(pid) - before) / load["events"])
            samples[name]["coalesced_share"].append(load["coalesced_share"])
            samples[name]["token_coalesced_share"].append(load["token_coalesced_share"])
            samples[name]["events_per_s"].append(load["events_per_s"])
            first = stream_load(target["ttft"], seconds, max_tokens=10)
            samples[name]["ttft_p50_ms"].append(first["ttft_p50_ms"])
            print(f"  round {round_ + 1} {name:24} p50 c=1 {samples[name]['p50_c1_us'][-1]} us, "
                  f"{samples[name]['rps_c16'][-1]:.0f} req/s c=16, {load['events_per_s']} events/s, "
                  f"TTFT p50 {first['ttft_p50_ms']} ms", flush=True)
    medians = {name: {key: round(statistics.median(values), 4) if values else None
                      for key, values in figures.items()} for name, figures in samples.items()}
    direct = medians["direct"]
    for name, figures in medians.items():
        if name != "direct":
            figures["added_p50_c1_ms"] = round((figures["p50_c1_us"] - direct["p50_c1_us"]) / 1000, 4)
            figures["ttft_p50_added_ms"] = round(figures["ttft_p50_ms"] - direct["ttft_p50_ms"], 3)
    return {"rounds": rounds, "seconds": seconds, "nginx_skipped": skipped, "medians": medians,
            "samples": samples, "goals": goals(medians)}


def goals(medians: dict) -> list[dict]:
    """Each goal: autosleepd's figure, nginx's, and whether it is met."""
    ours, nginx = medians["autosleepd"], medians.get("nginx", {})
    rows = [{"goal": key, "limit": limit, "autosleepd": ours[key], "nginx": nginx.get(key),
             "met": ours[key] is not None and ours[key] <= limit} for key, limit in GOALS.items()]
    # Coalescing is judged on tokens: the engine writes "data: [DONE]" right after the last token,
    # and a proxy that reads the two at once (nginx does too, in nearly every stream) has delayed
    # no token. Reads of several events, [DONE] counted, are reported beside it.
    share = nginx.get("token_coalesced_share")
    rows.append({"goal": "token_coalesced_share", "limit": "<= nginx",
                 "autosleepd": ours["token_coalesced_share"], "nginx": share,
                 "met": share is not None and ours["token_coalesced_share"] <= share})
    return rows


def data_path_report(data: dict) -> str:
    names = list(data["medians"])
    lines = [f"Data path: medians of {data['rounds']} interleaved rounds of {data['seconds']} s each",
             "", "| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in (("p50_c1_us", "p50 at 1 connection (us)"),
                       ("added_p50_c1_ms", "added p50 at 1 connection (ms)"),
                       ("rps_c16", "requests/s at 16 connections"),
                       ("cpu_per_request_us", "CPU per request at 16 connections (us)"),
                       ("events_per_s", "events/s, 256 streams, a token per 20 ms"),
                       ("cpu_per_event_us", "CPU per streamed event (us)"),
                       ("coalesced_share", "reads carrying several events"),
                       ("token_coalesced_share", "  several tokens ([DONE] not counted)"),
                       ("ttft_p50_ms", "time to first event p50, 256 streams, a token per 50 ms (ms)"),
                       ("ttft_p50_added_ms", "  added to direct's (ms)")):
        cells = []
        for name in names:
            value = data["medians"][name].get(key)
            cells.append("" if value is None else f"{value:g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| goal | limit | autosleepd | nginx | autosleepd / nginx | met |", "|---|---|---|---|---|---|"]
    for row in data["goals"]:
        ratio = (f"{row['autosleepd'] / row['nginx']:.2f}" if row["nginx"] and row["autosleepd"] is not None
                 else "")
        lines.append(f"| {row['goal']} | {row['limit']} | {row['autosleepd']} | {row['nginx']} | "
                     f"{ratio} | {'yes' if row['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


# ----- report ---------------------------------------------------------------------------------

def report(results: dict) -> str:
    runs = results["proxying"]["runs"]
    lines = [f"Machine: {results['machine']['cpus']} cores, {results['machine']['python']}, "
             f"{results['machine']['platform']}; `{results['command']}`", "",
             "| target | conc. | req/s | vs direct | p50 ms | p99 ms | p99.9 ms | autosleepd CPU (cores) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, run in runs.items():
        name, connections = key.rsplit(" c=", 1)
        direct = runs[f"direct c={connections}"]
        p = run["percentiles_us"]
        lines.append(f"| {name} | {connections} | {run['rps']:.0f} | {run['rps'] / direct['rps']:.2f} | "
                     f"{p['50'] / 1000:.3f} | {p['99'] / 1000:.3f} | {p['99.9'] / 1000:.3f} | "
                     f"{run.get('autosleepd_cpu_cores', '')} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no matplotlib: no plot)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, connections in zip(axes, (1, 16, 64)):
        for key, run in results["proxying"]["runs"].items():
            if key.endswith(f" c={connections}"):
                curve = [us / 1000 for us in run["curve_us"]]
                ax.plot(list(range(1, 100)) + [99.9], curve, label=key.rsplit(" c=", 1)[0])
        ax.set_title(f"latency by percentile, {connections} connection(s)")
        ax.set_xlabel("percentile")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"POST /v1/completions to the simulator: direct, through autosleepd, through nginx "
                 f"({results['machine']['cpus']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, to check the script")
    parser.add_argument("--baseline", metavar="GIT_REF",
                        help="also run autosleepd as of this commit in the data-path rounds")
    parser.add_argument("--only-data-path", action="store_true", help="run only section 5")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench: wrk is required (apt-get install wrk)")
        return 1
    seconds, idle = (3, 5) if args.quick else (10, 60)
    # SIGTERM and SIGHUP end the run like Ctrl-C: the finally below stops every child.
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, lambda number, _: sys.exit(128 + number))
    print("bench: " + ("short runs" if args.quick else "about 10 minutes (data-path rounds, 10 s per load cell, "
                       "60 s idle)") + f"; results in {RESULTS}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "command": "python bench/bench.py" + (" --quick" if args.quick else "")
               + (f" --baseline {args.baseline}" if args.baseline else "")
               + (" --only-data-path" if args.only_data_path else "")}
    with tempfile.TemporaryDirectory() as workdir:
        services = Services(Path(workdir))
        try:
            print("5. data path (side by side, interleaved rounds)", flush=True)
            baseline = baseline_tree(args.baseline, Path(workdir)) if args.baseline else None
            results["data_path"] = data_path(services, 1 if args.quick else 3, 2 if args.quick else 5,
                                             baseline, args.baseline)
            services.stop()
            services.processes.clear()
            print(data_path_report(results["data_path"]), flush=True)
            if args.only_data_path:
                (RESULTS / "data_path.json").write_text(json.dumps(results, indent=2))
                (RESULTS / "data_path.md").write_text(data_path_report(results["data_path"]))
                return 0
            pids: dict = {}
            print("1. plain proxying", flush=True)
            results["proxying"] = proxying(services, seconds, pids)
            services.stop()
            services.processes.clear()
            print("2. streaming", flush=True)
            results["streaming"] = asyncio.run(streaming(services, 3 if args.quick else 10))
            print(f"  {results['streaming']}", flush=True)
            services.stop()
            services.processes.clear()
            print("3. wake path", flush=True)
            results["wake_path"] = asyncio.run(wake_path(services))
            services.stop()
            services.processes.clear()
            print(f"4. idle footprint ({idle}s)", flush=True)
            results["idle"] = idle_footprint(services, idle)
            print(f"  {results['idle']}", flush=True)
        finally:
            services.stop()
    (RESULTS / "bench.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "bench.md").write_text(report(results) + "\n" + data_path_report(results["data_path"]))
    (RESULTS / "data_path.md").write_text(data_path_report(results["data_path"]))
    plot(results, RESULTS / "latency.png")
    print(report(results))
    print(data_path_report(results["data_path"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
