"""The daemon as users run it: a real ``python -m autosleepd`` process, signals and all."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys


from autosleepd.sim import expected_text

from .conftest import completion, wait_state


async def test_sigterm_lets_a_running_stream_finish_then_exits_0(make_sim, start_daemon, http):
    sim = await make_sim(token_seconds=0.03)
    daemon = await start_daemon(sim.url)
    await wait_state(http, daemon, "awake")
    async with http.post(daemon.url + "/v1/completions",
                         json=completion("finish me", 20, stream=True)) as response:
        await response.content.readline()
        daemon.process.send_signal(signal.SIGTERM)
        body = await response.read()
    texts = [json.loads(line[6:])["choices"][0]["text"]
             for line in body.split(b"\n") if line.startswith(b"data: {")]
    assert "".join(texts) == expected_text("finish me", 20)[len(" finish"):]
    assert await asyncio.wait_for(daemon.read_log_until_exit(), 10) == 0
    assert [line["event"] for line in daemon.lines][-1] == "stopped"


async def test_sigterm_answers_held_requests_with_503(make_sim, start_daemon, http):
    sim = await make_sim()
    daemon = await start_daemon(sim.url)
    await wait_state(http, daemon, "awake")
    async with http.post(daemon.url + "/autosleepd/sleep") as response:
        assert response.status == 200
    sim.fail_next("/wake_up", hang=True)
    held = asyncio.create_task(http.post(daemon.url + "/v1/completions", json=completion()))
    await wait_state(http, daemon, "waking")
    daemon.process.send_signal(signal.SIGTERM)
    response = await held
    assert response.status == 503 and response.headers["Retry-After"]
    assert (await response.json())["error"]["code"] == "shutting_down"
    assert await asyncio.wait_for(daemon.read_log_until_exit(), 10) == 0


async def test_a_second_signal_exits_at_once(make_sim, start_daemon, http):
    sim = await make_sim(token_seconds=0.05)
    daemon = await start_daemon(sim.url, AUTOSLEEPD_SHUTDOWN_TIMEOUT="60s")
    await wait_state(http, daemon, "awake")
    response = await http.post(daemon.url + "/v1/completions",
                               json=completion("endless", 100_000, stream=True))
    await response.content.readline()
    daemon.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):   # the first signal is being handled: draining
        while (line := json.loads(await daemon.process.stderr.readline()))["event"] != "shutting_down":
            daemon.lines.append(line)
    daemon.process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(daemon.read_log_until_exit(), 10) == 1
    assert daemon.lines[-1]["event"] == "forced_exit"
    response.close()


async def test_logs_are_one_json_event_per_line_with_transitions_and_durations(make_sim, start_daemon, http):
    sim = await make_sim(sleep_seconds=0.1)
    daemon = await start_daemon(sim.url, AUTOSLEEPD_IDLE_TIMEOUT="100ms")
    await wait_state(http, daemon, "asleep")
    daemon.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(daemon.read_log_until_exit(), 10) == 0
    transitions = [line for line in daemon.lines if line["event"] == "transition"]
    assert [(t["from_state"], t["to_state"], t["reason"]) for t in transitions] == [
        ("starting", "awake", "found_awake"), ("awake", "falling_asleep", "idle"),
        ("falling_asleep", "asleep", "slept")]
    assert transitions[-1]["order"] == "idle"
    assert transitions[-1]["duration_s"] >= 0.1 and transitions[-1]["sleep_level"] == 1
    assert all({"timestamp", "level"} <= line.keys() for line in daemon.lines)
    # No GPU here: it says once that the memory guard is off, and otherwise works as usual.
    assert [line["event"] for line in daemon.lines].count("memory_guard_off") == 1


async def test_a_port_in_use_is_a_clear_error(make_sim):
    sim = await make_sim()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTOSLEEPD_")}
    environ.update({"AUTOSLEEPD_UPSTREAM": sim.url, "AUTOSLEEPD_HOST": "127.0.0.1",
                    "AUTOSLEEPD_PORT": str(sim.port)})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "autosleepd", env=environ, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert f"cannot listen on 127.0.0.1:{sim.port}" in stderr.decode()


async def test_the_demo_shows_a_sleep_and_a_wake():
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTOSLEEPD_")}
    environ.update({"AUTOSLEEPD_PORT": "0", "AUTOSLEEPD_IDLE_TIMEOUT": "200ms",
                    "AUTOSLEEPD_LOG_FORMAT": "json"})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "autosleepd", "demo", env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    said = []
    async with asyncio.timeout(30):
        async for line in process.stdout:
            said.append(line.decode())
            if "the tour is over" in said[-1]:
                break
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0
    answers = [line for line in said if line.startswith("demo: ") and ": 200 in " in line]
    assert len(answers) == 2 and "hello from the demo" in answers[1]
    events = [json.loads(line) for line in stderr.decode().splitlines()]
    moves = [(e["from_state"], e["to_state"]) for e in events if e["event"] == "transition"]
    assert ("falling_asleep", "asleep") in moves and ("waking", "awake") in moves
