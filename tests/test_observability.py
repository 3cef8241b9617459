"""What operators watch: Prometheus metrics, systemd notifications, and the command line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys

from prometheus_client.parser import text_string_to_metric_families

from autosleepd.control.states import State
from autosleepd.notify import SystemdNotifier

from .conftest import OneGpu, completion, eventually, post_completion


async def scrape(http, server) -> dict[tuple, float]:
    async with http.get(server.url + "/autosleepd/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_follow_the_state_and_count_sleeps_wakes_and_requests(make_sim, make_proxy, http):
    sim = await make_sim(wake_seconds=0.1)
    server = await make_proxy(sim.url)
    samples = await scrape(http, server)
    assert value(samples, "autosleepd_state", state="awake") == 1
    assert value(samples, "autosleepd_state", state="asleep") == 0
    assert value(samples, "autosleepd_sleep_supported") == 1

    async with http.post(server.url + "/autosleepd/sleep") as response:
        assert response.status == 200
    samples = await scrape(http, server)
    assert value(samples, "autosleepd_state", state="asleep") == 1
    assert value(samples, "autosleepd_sleeps_total", level="1", reason="manual") == 1
    assert value(samples, "autosleepd_sleep_duration_seconds_count", level="1") == 1

    assert (await post_completion(http, server.url))[0] == 200
    async with http.post(server.url + "/sleep") as response:
        assert response.status == 403
    samples = await scrape(http, server)
    assert value(samples, "autosleepd_wakes_total", level="1", reason="request") == 1
    assert value(samples, "autosleepd_wake_duration_seconds_sum", level="1") >= 0.1
    assert value(samples, "autosleepd_hold_duration_seconds_count") == 1
    assert value(samples, "autosleepd_requests_total", kind="work", code="2xx") == 1
    assert value(samples, "autosleepd_requests_total", kind="blocked", code="4xx") == 1
    assert value(samples, "autosleepd_requests_refused_total", reason="blocked_path") == 1
    assert value(samples, "autosleepd_transitions_total", from_state="waking", to_state="awake") == 1


async def test_the_gpu_memory_a_sleep_frees_is_reported(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, gpu=OneGpu(sim))
    samples = await scrape(http, server)
    assert ("autosleepd_gpu_memory_freed_bytes", ()) not in samples   # unknown until a sleep
    await server.supervisor.order_sleep(1)
    samples = await scrape(http, server)
    assert value(samples, "autosleepd_gpu_memory_freed_bytes") == 68 * 2**30
    async with http.get(server.url + "/autosleepd/status") as response:
        assert (await response.json())["gpu_memory_freed_bytes"] == 68 * 2**30


async def test_metrics_show_requests_held_and_in_flight_now(make_sim, make_proxy, http):
    sim = await make_sim(token_seconds=0.05)
    server = await make_proxy(sim.url, max_queue=1)
    stream = await http.post(server.url + "/v1/completions", json=completion("s", 1000, stream=True))
    await stream.content.readline()
    samples = await scrape(http, server)
    assert value(samples, "autosleepd_requests_in_flight") == 1
    assert value(samples, "autosleepd_idle_seconds") == 0
    stream.close()
    await eventually(lambda: server.supervisor.admission.in_flight == 0)

    await server.supervisor.order_sleep(1)
    sim.fail_next("/wake_up", hang=True)
    held = asyncio.create_task(post_completion(http, server.url))
    await eventually(lambda: server.supervisor.admission.queued == 1)
    async with http.post(server.url + "/v1/completions", json=completion()) as response:
        assert response.status == 503
    samples = await scrape(http, server)
    assert value(samples, "autosleepd_requests_held") == 1
    assert value(samples, "autosleepd_requests_refused_total", reason="queue_full") == 1
    held.cancel()


def test_the_notifier_is_silent_outside_systemd():
    notifier = SystemdNotifier(env={})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.watch("engine", State.AWAKE)
    notifier.ready()   # no socket, no error


def test_the_notifier_reaches_an_abstract_socket():
    name = f"autosleepd-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(5)
    notifier = SystemdNotifier(env={"NOTIFY_SOCKET": "@" + name})
    notifier.watch("engine", State.ASLEEP)
    notifier.ready()
    assert receiver.recv(4096).decode().split("\n") == ["READY=1", "STATUS=engine asleep"]
    receiver.close()
    notifier.close()


async def test_under_systemd_it_sends_ready_status_and_watchdog_pings(make_sim, start_daemon, http, tmp_path):
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.setblocking(False)
    loop = asyncio.get_running_loop()
    sim = await make_sim()
    daemon = await start_daemon(sim.url, NOTIFY_SOCKET=path, WATCHDOG_USEC="100000",
                                AUTOSLEEPD_IDLE_TIMEOUT="200ms")
    seen: list[str] = []
    async with asyncio.timeout(10):
        while not any("STATUS=engine asleep" in message for message in seen) or \
                sum("WATCHDOG=1" in message for message in seen) < 3:
            seen.append((await loop.sock_recv(receiver, 4096)).decode())
    daemon.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        while "STOPPING=1" not in seen[-1]:
            seen.append((await loop.sock_recv(receiver, 4096)).decode())
    assert await daemon.process.wait() == 0
    ready = [message for message in seen if "READY=1" in message]
    assert len(ready) == 1
    statuses = [line for message in seen for line in message.split("\n") if line.startswith("STATUS=")]
    assert "STATUS=engine asleep (slept)" in statuses
    receiver.close()


async def cli(*args: str, **env: str) -> tuple[int, str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTOSLEEPD_")}
    environ.update(env)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "autosleepd", *args, env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def test_the_command_line_shows_status_and_sleeps_and_wakes_the_engine(make_sim, make_proxy):
    sim = await make_sim()
    server = await make_proxy(sim.url, admin_token="tok")
    env = {"AUTOSLEEPD_URL": server.url, "AUTOSLEEPD_ADMIN_TOKEN": "tok"}
    code, out, _ = await cli("status", **env)
    assert code == 0 and out.startswith("state:      awake")
    code, out, _ = await cli("sleep", "--level", "2", **env)
    assert code == 0 and "asleep" in out and "level 2" in out and sim.level == 2
    code, out, _ = await cli("status", "--json", **env)
    assert code == 0 and json.loads(out)["state"] == "asleep"
    code, out, _ = await cli("wake", **env)
    assert code == 0 and out.startswith("state:      awake") and not sim.sleeping


async def test_the_command_line_fails_clearly(make_sim, make_proxy):
    sim = await make_sim()
    server = await make_proxy(sim.url, admin_token="tok")
    code, _, err = await cli("sleep", AUTOSLEEPD_URL=server.url, AUTOSLEEPD_ADMIN_TOKEN="wrong")
    assert code == 1 and "401" in err and "AUTOSLEEPD_ADMIN_TOKEN" in err
    assert not sim.sleeping
    code, _, err = await cli("status", AUTOSLEEPD_URL="http://127.0.0.1:9")
    assert code == 1 and "cannot reach autosleepd at http://127.0.0.1:9" in err
    code, _, err = await cli("status", AUTOSLEEPD_PORT="nope")
    assert code == 2 and "AUTOSLEEPD_PORT" in err


async def test_metrics_and_status_show_the_next_planned_transition(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, idle_timeout=300.0)
    samples = await scrape(http, server)
    assert 290 < value(samples, "autosleepd_next_transition_seconds") <= 300
    assert value(samples, "autosleepd_ladder_steps_total", outcome="done") == 0
    async with http.get(server.url + "/autosleepd/status") as response:
        upcoming = (await response.json())["next_transition"]
    assert upcoming["what"] == "sleep at level 1: idle 300s" and upcoming["at"].endswith("+00:00")
    await server.supervisor.order_sleep(1)
    samples = await scrape(http, server)
    assert value(samples, "autosleepd_next_transition_seconds") == -1   # asleep, nothing planned
