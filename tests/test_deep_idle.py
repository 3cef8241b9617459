"""Deep idle: the ladder's stop rung, the GPU's power and energy per state, the chosen level.

The stop rung: the engine's process stopped and started by operator commands.

The commands are real shell commands (curl) that reach the simulator's launcher, which kills and
starts a simulated vLLM on a fixed port, as ``systemctl stop/start vllm@NAME`` would. The supervisor runs
on a manual clock, so twelve idle hours pass in milliseconds; a start can be held back (the
launcher's gate) to play a slow cold start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from datetime import datetime
from zoneinfo import ZoneInfo
import subprocess
import sys

import pytest
import structlog
from structlog.testing import capture_logs

from autosleepd.cli.remote import summary
from autosleepd.clock import ManualClock
from autosleepd.config import Config, ConfigError
from autosleepd.gpu.readers import NvmlReader
from autosleepd.policy.level import LevelInputs, LevelTimes, choose_level
from autosleepd.policy.prewake import PrewakeLearner
from autosleepd.control.states import State
from autosleepd.server import Autosleepd
from autosleepd.sim import SimSettings, SimulatedEngine, expected_text
from autosleepd.sim.gpu import SimGpu, SimProcesses
from autosleepd.sim.launcher import Launcher

from .conftest import FakeEngine, completion, eventually, settle
from .test_policy import Guard


LADDER = "5m:1,2h:2,12h:stop"


@pytest.fixture
async def rig(tmp_path):
    made = []

    async def make(ladder: str = LADDER, stop: str | None = None, start: str | None = None,
                   sim: dict | None = None, energy_counter: bool = True, engine_up: bool = True,
                   **overrides):
        clock = ManualClock()
        gpu = SimGpu(clock=clock if energy_counter else None)
        engine = SimulatedEngine(SimSettings(**(sim or {})), gpu=gpu)
        if engine_up:
            await engine.start()
        launcher = Launcher(engine)
        await launcher.open()
        env = {"AUTOSLEEPD_LADDER": ladder,
               "AUTOSLEEPD_ENGINE_STOP_COMMAND": stop or launcher.command("stop"),
               "AUTOSLEEPD_ENGINE_START_COMMAND": start or launcher.command("start"),
               "AUTOSLEEPD_ENGINE_RESTART_COMMAND": f"echo restart >> {tmp_path}/restarts"}
        settings = dict(upstream=engine.url, host="127.0.0.1", port=0, wake_timeout=600.0,
                        probe_interval=3600.0)
        config = dataclasses.replace(Config.from_env(env), **{**settings, **overrides})
        server = Autosleepd(config, clock=clock, gpu=gpu, processes=SimProcesses(engine))
        await server.start()
        made.append((server, launcher))
        await server.supervisor.wait_for(State.AWAKE if engine_up else State.STOPPED, timeout=5)
        await eventually(lambda: server.power.watts is not None, what="a first power reading")
        return Rig(server, launcher, clock, tmp_path)

    yield make
    for server, launcher in made:
        assert not server._control.done(), server._control   # the control loop never dies
        await server.shutdown()
        await launcher.close()


@dataclasses.dataclass
class Rig:
    server: Autosleepd
    launcher: Launcher
    clock: ManualClock
    tmp: object

    @property
    def supervisor(self):
        return self.server.supervisor

    async def idle_until(self, seconds: float, predicate, what: str) -> None:
        """Let idle time pass up to ``seconds`` after the last work, a minute at a time."""
        target = self.supervisor.admission.last_work_end + seconds
        while self.clock.now() < target:
            self.clock.advance(min(60.0, target - self.clock.now()))
            await eventually(self.settled, what="the supervisor done with what was due")
        try:
            await eventually(predicate, what=what)
        except AssertionError:
            raise AssertionError(f"{what}: {self.supervisor.status()}") from None

    async def ask(self, http, prompt: str = "hello world") -> tuple[int, dict, dict]:
        async with http.post(self.server.url + "/v1/completions",
                             json=completion(prompt)) as response:
            return response.status, dict(response.headers), await response.json()

    def settled(self) -> bool:
        """Nothing due is left undone, and the power meter has read the GPU since."""
        now, status = self.clock.now(), self.supervisor.status()
        planned = status.next_transition
        return (status.state in (State.AWAKE, State.ASLEEP, State.STOPPED)
                and (planned is None or planned.at > now) and self.server.power.read_until >= now)

    def restarts(self) -> int:
        path = os.path.join(self.tmp, "restarts")
        return len(open(path).readlines()) if os.path.exists(path) else 0


async def test_the_ladder_walks_level_one_two_and_stop_and_a_request_at_each_rung_is_served(rig, http):
    r = await rig()
    s = r.supervisor
    asleep_at = lambda level: lambda: s.state is State.ASLEEP and s.asleep_level == level  # noqa: E731
    for rung, reached in ((1, asleep_at(1)), (2, asleep_at(2)), ("stop", lambda: s.state is State.STOPPED)):
        await r.idle_until(300, asleep_at(1), "level 1 after 5 idle minutes")
        if rung != 1:
            await r.idle_until(7200, asleep_at(2), "level 2 after 2 idle hours")
        if rung == "stop":
            await r.idle_until(12 * 3600, reached, "the engine stopped after 12 idle hours")
            assert not r.launcher.engine.listening            # its process is gone
            assert s.status().to_json()["stops"] == 1
        status, _, body = await r.ask(http, f"rung {rung}")
        assert status == 200 and body["choices"][0]["text"] == expected_text(f"rung {rung}", 4)
        assert s.state is State.AWAKE
    assert r.launcher.stops == 1 and r.launcher.starts == 1   # one stop, one start for it
    stats = s.status().to_json()
    assert stats["starts"] == 1 and stats["last_start_seconds"] is not None
    assert r.restarts() == 0                                  # stopped is not broken
    assert r.launcher.engine.stats.violations == {}          # nothing reached it asleep
    metrics = await (await http.get(r.server.url + "/autosleepd/metrics")).text()
    assert "autosleepd_engine_stops_total 1.0" in metrics
    assert 'autosleepd_engine_starts_total{outcome="ok"} 1.0' in metrics


async def test_many_requests_to_a_stopped_engine_share_one_start(rig, http):
    r = await rig(ladder="5m:1,1h:stop")
    await r.idle_until(3600, lambda: r.supervisor.state is State.STOPPED, "stopped")
    r.launcher.gate.clear()
    asks = [asyncio.create_task(r.ask(http, f"user {i}")) for i in range(20)]
    await eventually(lambda: r.supervisor.admission.queued == 20, what="all 20 held")
    r.launcher.gate.set()
    r.clock.advance(1.0)   # the next /health poll finds it up
    answers = await asyncio.gather(*asks)
    assert [a[0] for a in answers] == [200] * 20
    assert [a[2]["choices"][0]["text"] for a in answers] == [expected_text(f"user {i}", 4) for i in range(20)]
    assert r.launcher.starts == 1


async def test_a_start_command_that_fails_answers_503_then_backs_off(rig, http):
    r = await rig(ladder="5m:1,1h:stop")
    failing = f"echo run >> {r.tmp}/starts; echo 'Failed to start vllm@qwen.service: Unit not found.' >&2; exit 5"
    await r.idle_until(3600, lambda: r.supervisor.state is State.STOPPED, "stopped")
    r.server.supervisor.config = dataclasses.replace(r.supervisor.config, start_command=failing)
    held = [asyncio.create_task(r.ask(http, f"user {i}")) for i in range(3)]
    answers = await asyncio.gather(*held)
    for status, headers, body in answers:
        assert status == 503 and body["error"]["code"] == "engine_start_failed"
        assert "exited with status 5" in body["error"]["message"]
        assert headers["Retry-After"] == "10"                # AUTOSLEEPD_RESTART_BACKOFF
    assert len(open(f"{r.tmp}/starts").readlines()) == 1    # one start for all three
    assert r.supervisor.state is State.STOPPED
    status, headers, body = await r.ask(http)                # within the backoff: no new start
    assert status == 503 and body["error"]["code"] == "engine_start_failed"
    assert len(open(f"{r.tmp}/starts").readlines()) == 1
    json_status = r.supervisor.status().to_json()
    assert json_status["state"] == "stopped" and json_status["start_failures"] == 1
    assert "exited with status 5" in json_status["start_failure"]
    assert "start failed: AUTOSLEEPD_ENGINE_START_COMMAND exited with status 5" in summary(json_status)
    r.clock.advance(10)
    status, headers, body = await r.ask(http)                # backoff over: tried again
    assert status == 503 and headers["Retry-After"] == "20"  # and the backoff doubled
    assert len(open(f"{r.tmp}/starts").readlines()) == 2
    r.supervisor.config = dataclasses.replace(r.supervisor.config,
                                              start_command=r.launcher.command("start"))
    r.clock.advance(20)
    status, _, body = await r.ask(http, "at last")
    assert status == 200 and body["choices"][0]["text"] == expected_text("at last", 4)
    assert r.restarts() == 0


async def test_a_slow_start_past_the_hold_timeout_answers_retry_after_from_the_measured_start(rig, http):
    r = await rig(ladder="5m:1,1h:stop", wake_timeout=30.0)
    s = r.supervisor

    async def cold_start(prompt: str):
        await r.idle_until(3600, lambda: s.state is State.STOPPED, "stopped")
        r.launcher.gate.clear()
        asked = asyncio.create_task(r.ask(http, prompt))
        await eventually(lambda: s.state is State.LAUNCHING and r.launcher.starts, what="launching")
        return asked

    first = await cold_start("first")
    for _ in range(8):                                      # 40 s of loading
        r.clock.advance(5)
        await asyncio.sleep(0)
    status, headers, body = await first
    assert status == 503 and body["error"]["code"] == "wake_timeout"
    assert "cold start" in body["error"]["message"] and "AUTOSLEEPD_WAKE_TIMEOUT" in body["error"]["message"]
    second = asyncio.create_task(r.ask(http, "second"))     # arrives while it still loads
    await eventually(lambda: s.admission.queued == 1, what="the second held")
    r.launcher.gate.set()
    await eventually(lambda: r.launcher.engine.listening, what="the engine up")
    r.clock.advance(5)                                      # the next /health poll, 45 s in
    status, _, body = await second
    assert status == 200 and body["choices"][0]["text"] == expected_text("second", 4)
    assert s.stats.last_start_seconds == 45.0

    third = await cold_start("third")
    r.clock.advance(30)                                     # its hold timeout
    status, headers, body = await third
    assert status == 503 and headers["Retry-After"] == "15"   # 45 s measured, 30 s waited
    assert "the last took 45s" in body["error"]["message"]
    r.launcher.gate.set()


async def test_a_stop_command_that_fails_leaves_the_engine_asleep_and_is_retried_later(rig, http):
    r = await rig(ladder="5m:1,1h:stop", stop="echo 'Access denied' >&2; exit 1")
    s = r.supervisor
    await r.idle_until(3600, lambda: s.stats.stop_failures == 1, "the stop failed")
    assert s.state is State.ASLEEP and s.asleep_level == 1 and r.launcher.engine.listening
    assert "exited with status 1" in s.status().to_json()["last_error"]
    r.clock.advance(299)
    await eventually(r.settled, what="the supervisor done with what was due")
    assert s.stats.stop_failures == 1                        # no hammering
    r.clock.advance(1)
    await eventually(lambda: s.stats.stop_failures == 2, what="the stop tried again after 5 minutes")
    status, _, body = await r.ask(http)                      # the asleep engine still serves
    assert status == 200 and s.state is State.AWAKE
    assert r.restarts() == 0


async def test_an_engine_woken_behind_our_back_while_it_stops_is_followed_at_once(rig, http):
    wake = (f"{sys.executable} -c \"import os, urllib.request; urllib.request.urlopen("
            "urllib.request.Request(os.environ['AUTOSLEEPD_ENGINE_URL'] + '/wake_up', method='POST'))\"")
    r = await rig(ladder="5m:1,1h:stop", stop=wake)          # exits 0, and the engine is awake
    s = r.supervisor
    await r.idle_until(3600, lambda: s.state is State.AWAKE, "found awake, not waiting out the stop")
    assert r.launcher.engine.listening and not r.launcher.engine.sleeping
    status, _, _ = await r.ask(http)
    assert status == 200 and r.restarts() == 0


async def test_an_engine_started_by_hand_while_stopped_is_followed_not_restarted(rig, http):
    r = await rig(ladder="5m:1,1h:stop")
    s = r.supervisor
    await r.idle_until(3600, lambda: s.state is State.STOPPED, "stopped")
    await r.launcher.engine.start()                          # an operator: systemctl start
    r.clock.advance(3600)                                    # the next probe
    await eventually(lambda: s.state is State.AWAKE, what="found awake")
    status, _, _ = await r.ask(http)
    assert status == 200 and r.launcher.starts == 0 and r.restarts() == 0


async def test_an_engine_found_down_when_autosleepd_starts_is_started_by_the_first_request(rig, http):
    r = await rig(ladder="5m:1,1h:stop", engine_up=False)   # stopped before autosleepd restarted
    assert r.supervisor.state is State.STOPPED and r.restarts() == 0
    status, _, body = await r.ask(http, "after a restart")
    assert status == 200 and body["choices"][0]["text"] == expected_text("after a restart", 4)
    assert r.launcher.starts == 1


async def test_a_start_never_healthy_in_time_is_refused_and_stopped_again(rig, http):
    r = await rig(ladder="5m:1,1h:stop", engine_start_timeout=60.0)
    s = r.supervisor
    await r.idle_until(3600, lambda: s.state is State.STOPPED, "stopped")
    r.launcher.gate.clear()                                  # it launches, but never loads
    asked = asyncio.create_task(r.ask(http))
    await eventually(lambda: r.launcher.starts == 1 and s.state is State.LAUNCHING, what="launching")
    r.clock.advance(60)                                      # the next /health poll is past it
    status, headers, body = await asked
    assert status == 503 and body["error"]["code"] == "engine_start_failed"
    assert "not healthy within AUTOSLEEPD_ENGINE_START_TIMEOUT=60s" in body["error"]["message"]
    assert r.launcher.stops == 2                             # stopped again: the next start is clean
    assert s.state is State.STOPPED and headers["Retry-After"] == "10"


async def test_a_stop_command_that_fails_after_the_engine_is_gone_still_stops(rig, http):
    r = await rig(ladder="5m:1,1h:stop")
    r.supervisor.config = dataclasses.replace(r.supervisor.config,
                                              stop_command=r.launcher.command("stop") + "; exit 3")
    await r.idle_until(3600, lambda: r.supervisor.state is State.STOPPED, "stopped")
    assert r.supervisor.stats.stops == 1 and r.supervisor.stats.stop_failures == 0
    status, _, _ = await r.ask(http)
    assert status == 200


async def test_a_manual_wake_starts_a_stopped_engine(rig, http):
    r = await rig(ladder="5m:1,1h:stop")
    await r.idle_until(3600, lambda: r.supervisor.state is State.STOPPED, "stopped")
    async with http.post(r.server.url + "/autosleepd/wake") as response:
        assert response.status == 200
    assert r.supervisor.state is State.AWAKE and r.launcher.starts == 1


# ----- configuration ----------------------------------------------------------------------------

COMMANDS = {"AUTOSLEEPD_ENGINE_STOP_COMMAND": "systemctl stop vllm@qwen",
            "AUTOSLEEPD_ENGINE_START_COMMAND": "systemctl start vllm@qwen"}


def test_a_stop_rung_is_read_as_the_ladders_end():
    config = Config.from_env({"AUTOSLEEPD_LADDER": "5m:1,2h:2,12h:stop", **COMMANDS})
    assert config.ladder.rungs == ((300, 1), (7200, 2)) and config.ladder.stop_after == 43200
    assert config.engine_start_timeout == 600


@pytest.mark.parametrize("ladder, env, named", [
    ("5m:1,12h:stop,13h:2", COMMANDS, "can only be the last rung"),
    ("12h:stop", COMMANDS, "no sleep rung before 'stop'"),
    ("5m:1,2h:2,1h:stop", COMMANDS, "longer idle time"),
    ("5m:1,12h:stop", {}, "AUTOSLEEPD_ENGINE_STOP_COMMAND and AUTOSLEEPD_ENGINE_START_COMMAND"),
    ("5m:1,12h:stop", {"AUTOSLEEPD_ENGINE_STOP_COMMAND": "kill 1"}, "with AUTOSLEEPD_ENGINE_START_COMMAND set"),
    ("5m:1,12h:stop", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, "Kubernetes pod"),
])
def test_a_stop_rung_that_cannot_work_is_a_config_error(ladder, env, named):
    with pytest.raises(ConfigError, match="AUTOSLEEPD_LADDER") as error:
        Config.from_env({"AUTOSLEEPD_LADDER": ladder, **env})
    assert named in str(error.value)


def test_a_kubernetes_sidecar_with_a_stop_rung_exits_2_at_start():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOSLEEPD_")}
    env.update({"AUTOSLEEPD_PORT": "1", "AUTOSLEEPD_LADDER": "5m:1,12h:stop",
                "KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    result = subprocess.run([sys.executable, "-m", "autosleepd"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "AUTOSLEEPD_LADDER" in result.stderr and "Kubernetes pod" in result.stderr


async def test_the_commands_output_is_logged_with_secrets_masked(rig, http):
    key = "sk-0123456789abcdef0123"
    r = await rig(ladder="5m:1,1h:stop", upstream_api_key=key,
                  stop="echo stopping with key sk-0123456789abcdef0123 >&2; exit 1")
    with capture_logs() as logs:
        await r.idle_until(3600, lambda: r.supervisor.stats.stop_failures == 1, "the stop failed")
    failed = [e for e in logs if e["event"] == "engine_stop_command_failed"]
    assert failed and failed[0]["exit_status"] == 1
    assert "stopping with key ***" in failed[0]["output"]
    assert key not in repr(logs) and key not in repr(r.supervisor.status().to_json())


# ----- power ----------------------------------------------------------------------------------

# Draws above the bare GPU's 77.5 W: awake idle 121.2 W in all, level 1 122.5 W, level 2 117.5 W.
DRAWS = {"awake_idle_watts": 43.7, "asleep_watts": {1: 45.0, 2: 40.0}}


async def test_energy_is_counted_per_state_and_the_saving_from_measured_draws(rig, http):
    r = await rig(sim=DRAWS)
    s = r.supervisor
    await r.idle_until(300, lambda: s.state is State.ASLEEP, "level 1")
    power = s.status().power
    assert power["awake_idle_watts"] == 121.2                  # learned while awake and idle
    await r.idle_until(7200, lambda: s.asleep_level == 2 and s.state is State.ASLEEP, "level 2")
    await r.idle_until(12 * 3600, lambda: s.state is State.STOPPED, "stopped")
    await r.idle_until(13 * 3600, lambda: True, "an hour stopped")
    power = s.status().power
    assert power["watts"] == 77.5
    assert power["source"] == "energy counter"
    assert power["energy_wh"]["awake"] == pytest.approx(300 * 121.2 / 3600, abs=1e-3)
    assert power["energy_wh"]["asleep"] == pytest.approx((6900 * 122.5 + 36000 * 117.5) / 3600, abs=1e-3)
    assert power["energy_wh"]["stopped"] == pytest.approx(3600 * 77.5 / 3600, abs=1e-3)
    # Level 1 drew 1.3 W more than idling awake (a loss); level 2 3.7 W less; stopped 43.7 W less.
    saved = 6900 * (121.2 - 122.5) + 36000 * (121.2 - 117.5) + 3600 * (121.2 - 77.5)
    assert power["saved_wh"] == pytest.approx(saved / 3600, abs=1e-3)
    metrics = await (await http.get(r.server.url + "/autosleepd/metrics")).text()
    assert 'autosleepd_gpu_power_watts{gpu="GPU-sim-0"} 77.5' in metrics
    assert "autosleepd_gpu_awake_idle_watts 121.2" in metrics
    assert 'autosleepd_gpu_energy_watt_hours_total{state="stopped"} 77.5' in metrics
    assert f"autosleepd_energy_saved_watt_hours {round(saved / 3600, 4)}" in metrics
    assert "77.5 W now (awake idle: 121.2 W)" in summary(s.status().to_json())


async def test_without_an_energy_counter_energy_comes_from_the_power_readings(rig):
    r = await rig(ladder="5m:1,1h:stop", sim=DRAWS, energy_counter=False)
    s = r.supervisor
    await r.idle_until(3600, lambda: s.state is State.STOPPED, "stopped")
    await r.idle_until(4200, lambda: True, "ten minutes stopped")
    power = s.status().power
    assert power["source"] == "power readings"
    assert power["energy_wh"]["asleep"] == pytest.approx(3300 * 122.5 / 3600, abs=1e-3)
    assert power["energy_wh"]["stopped"] == pytest.approx(600 * 77.5 / 3600, abs=1e-3)


async def test_nothing_counts_as_saved_before_the_awake_idle_draw_is_measured(rig):
    r = await rig(ladder="5s:1,1h:stop", sim=DRAWS)           # asleep before 10 idle seconds
    s = r.supervisor
    await r.idle_until(5, lambda: s.state is State.ASLEEP, "asleep")
    await r.idle_until(605, lambda: True, "ten minutes asleep")
    power = s.status().power
    assert power["awake_idle_watts"] is None and power["saved_wh"] == 0
    assert power["energy_wh"]["asleep"] == pytest.approx(600 * 122.5 / 3600, abs=1e-3)


def test_nvml_power_is_read_in_watts_and_missing_where_the_board_has_none(monkeypatch):
    class Error(Exception):
        pass

    class Handle:
        def __init__(self, index):
            self.index = index

    def refuse(handle):
        raise Error("Not Supported")

    fake = type("pynvml", (), dict(
        NVMLError=Error, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=Handle,
        nvmlDeviceGetMemoryInfo=lambda h: type("Info", (), {"total": 80, "used": 70}),
        nvmlDeviceGetUUID=lambda h: f"GPU-{h.index}".encode(),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [],
        nvmlDeviceGetPowerUsage=lambda h: 121_700 if h.index == 0 else refuse(h),
        nvmlDeviceGetTotalEnergyConsumption=lambda h: 5_000_000 if h.index == 0 else refuse(h)))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    first, second = NvmlReader().read()
    assert (first.power_watts, first.energy_joules) == (121.7, 5000.0)
    assert (second.power_watts, second.energy_joules) == (None, None)


# ----- AUTOSLEEPD_SLEEP_LEVEL=auto ------------------------------------------------------------

GIB = 2**30


def inputs(quiet_so_far=300.0, resumes_in=None, available=None, weights=None, times=None):
    return LevelInputs(times or LevelTimes(), quiet_so_far, resumes_in, available, weights, GIB)


def test_auto_picks_level_one_for_a_quiet_expected_as_long_as_the_idle_window():
    choice = choose_level(inputs(quiet_so_far=300))
    # The priors: level 2 wakes 1.58 s slower; 1/1000 of 300 s is 0.3 s.
    assert choice.level == 1 and "as long as the quiet so far" in choice.reason


def test_auto_picks_level_two_when_traffic_is_not_expected_for_hours():
    choice = choose_level(inputs(resumes_in=10 * 3600))
    assert choice.level == 2 and "traffic usually comes back" in choice.reason
    assert choose_level(inputs(resumes_in=1500)).level == 1    # 1.58 s is over 1/1000 of 1500 s
    assert choose_level(inputs(resumes_in=1600)).level == 2


def test_auto_picks_level_two_when_host_ram_cannot_take_the_weights():
    choice = choose_level(inputs(available=16 * GIB, weights=16 * GIB))   # the margin is missing
    assert choice.level == 2 and "host RAM has 16.0 GiB available" in choice.reason
    assert choose_level(inputs(available=18 * GIB, weights=16 * GIB)).level == 1


def test_auto_does_not_sleep_when_traffic_comes_back_before_a_sleep_and_wake():
    assert choose_level(inputs(resumes_in=2)).level is None           # level 2: 0.05 s + 2.34 s
    assert "shorter than a level-2 sleep and wake (2.39s)" in choose_level(inputs(resumes_in=2)).reason
    only_two = choose_level(inputs(resumes_in=5))                    # level 1: 8.05 s + 0.76 s
    assert only_two.level == 2 and "only a level-2 sleep and wake" in only_two.reason
    assert choose_level(inputs(resumes_in=9)).level == 1              # both fit; 1.58 s > 9 ms


def test_auto_uses_measured_times_over_the_priors():
    times = LevelTimes()
    for seconds in (14.1, 0.35, 0.36):                      # a slow first sleep, then fast ones
        times.record_sleep(1, seconds)
    for seconds in (0.64, 0.7, 0.66):
        times.record_wake(1, seconds)
    for seconds in (0.8, 0.9, 0.85):                          # level 2 reloads from page cache
        times.record_wake(2, seconds)
    assert times.sleep(1) == 0.36 and times.wake(2) == 0.85
    assert choose_level(inputs(quiet_so_far=300, times=times)).level == 2   # 0.19 s extra <= 0.3 s
    assert choose_level(inputs(resumes_in=1.0)).level is None              # the priors: nothing fits
    assert choose_level(inputs(resumes_in=1.0, times=times)).level == 2     # measured: 0.05 + 0.85 s


@contextlib.contextmanager
def info_logs():
    """Capture log events from info up (the suite logs warnings only)."""
    kept = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(wrapper_class=kept)


class RamGuard(Guard):
    """The policy tests' guard (room on the GPU), and the host RAM it reports."""

    def __init__(self, available: int, weights: int | None):
        super().__init__(room=True)
        self.available, self.weights = available, weights

    def host_ram(self): return self.available, self.weights


def wall(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo("UTC")).timestamp()


@pytest.fixture
async def auto(supervisors):
    async def make(start: str, guard=None, resumptions=()):
        config = dataclasses.replace(Config.from_env({"AUTOSLEEPD_SLEEP_LEVEL": "auto"}),
                                     probe_interval=3600)
        learner = None
        if resumptions:
            learner = PrewakeLearner(ZoneInfo("UTC"))
            learner.resumptions = [wall(t) for t in resumptions]
        clock = ManualClock(wall_start=wall(start))
        engine = FakeEngine()
        supervisor = await supervisors(config, engine, clock, guard=guard, learner=learner)
        return supervisor, engine, clock

    return make


MONDAYS_AT_NINE = ("2026-03-02 09:00", "2026-03-09 09:00")


@pytest.mark.parametrize("start, guard, resumptions, level, why", [
    ("2026-03-15 20:00", None, (), 1, "quiet expected for 300s (as long as the quiet so far)"),
    ("2026-03-15 20:00", None, MONDAYS_AT_NINE, 2, "quiet expected for 46500s (traffic usually comes back)"),
    ("2026-03-15 20:00", RamGuard(8 * GIB, 16 * GIB), (), 2, "host RAM has 8.0 GiB available"),
    ("2026-03-16 08:54:58", None, MONDAYS_AT_NINE, None, "quiet expected for 2s"),
])
async def test_auto_chooses_each_level_on_an_injected_clock_and_logs_why(auto, start, guard,
                                                                         resumptions, level, why):
    supervisor, engine, clock = await auto(start, guard, resumptions)
    with info_logs() as logs:
        clock.advance(300)
        await settle()
    chosen = [e for e in logs if e["event"] == "level_chosen"]
    assert len(chosen) == 1, (logs, supervisor.status())
    assert chosen[0]["sleep_level"] == level and why in chosen[0]["reason"]
    assert chosen[0]["quiet_so_far_s"] == 300 and chosen[0]["times"]["1"]["wake_s"] == 0.76
    if level is None:
        assert supervisor.state is State.AWAKE and engine.count("sleep") == 0
        assert supervisor.status().next_transition.at == clock.now() + 300   # asks again later
    else:
        assert supervisor.state is State.ASLEEP and engine.calls[-1] == ("sleep", level)
    assert supervisor.status().to_json()["sleep_level_auto"]["last_choice"]["level"] == level


async def test_auto_learns_sleep_and_wake_times_from_real_ones(auto):
    supervisor, engine, clock = await auto("2026-03-15 20:00")
    clock.advance(300)
    await settle()
    gate = engine.block("wake")
    held = asyncio.create_task(supervisor.admit())
    await settle()
    clock.advance(3.0)                                        # the wake takes 3 s
    gate.set()
    await held
    supervisor.release()
    times = supervisor.status().to_json()["sleep_level_auto"]["times"]
    assert times["1"]["wake_s"] == 3.0 and times["1"]["measured"] == 2
    assert times["2"] == {"sleep_s": 0.05, "wake_s": 2.34, "measured": 0}


async def test_the_commands_are_told_which_engine_so_one_command_serves_every_engine_of_a_host(rig, http, tmp_path):
    told = tmp_path / "told"
    r = await rig(ladder="5m:1,1h:stop")
    url = r.launcher.engine.url
    r.supervisor.config = dataclasses.replace(
        r.supervisor.config, engine_name="qwen",
        stop_command=f'echo "stop $AUTOSLEEPD_ENGINE $AUTOSLEEPD_ENGINE_URL" >> {told}; '
                     + r.launcher.command("stop"))
    await r.idle_until(3600, lambda: r.supervisor.state is State.STOPPED, "stopped")
    assert told.read_text() == f"stop qwen {url}\n"   # as in systemctl stop "vllm@$AUTOSLEEPD_ENGINE"


async def test_a_start_command_that_leaves_a_child_running_is_done_when_its_shell_exits(rig, http, tmp_path):
    """``vllm serve ... &`` keeps the command's output open as long as the engine runs: the
    start must not wait for that output to end."""
    r = await rig(ladder="5m:1,1h:stop")
    pid_file = tmp_path / "child.pid"
    r.supervisor.config = dataclasses.replace(
        r.supervisor.config,
        start_command=f"{r.launcher.command('start')}; sleep 300 & echo $! > {pid_file}")
    await r.idle_until(3600, lambda: r.supervisor.state is State.STOPPED, "stopped")
    try:
        status, _, body = await asyncio.wait_for(r.ask(http, "after the start"), 30)
        assert status == 200 and body["choices"][0]["text"] == expected_text("after the start", 4)
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), 9)


async def test_a_secret_across_the_cut_of_a_command_s_output_is_masked_whole():
    from autosleepd.control.restart import OUTPUT_KEPT, run_command
    secret = "sk-verysecretkey"
    # the secret, then enough after it that the last OUTPUT_KEPT characters start inside it
    result = await run_command(f"printf %s {secret}; head -c {OUTPUT_KEPT - 5} /dev/zero | tr '\\0' x",
                               10, secrets=(secret,))
    assert result.exit_status == 0 and len(result.output) <= OUTPUT_KEPT
    assert "tkey" not in result.output and result.output.endswith("x" * 100)
