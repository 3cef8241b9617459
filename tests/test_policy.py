"""Sleep policy beyond one timer: keep-awake windows, the learned pre-wake, the sleep ladder.

The supervisor runs on a manual clock with wall time, so weeks pass in milliseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from autosleepd.clock import ManualClock
from autosleepd.config import Config, ConfigError, parse_duration
from autosleepd.gpu.guard import Shortfall
from autosleepd.gpu.readers import GpuMemory
from autosleepd.policy.ladder import Ladder
from autosleepd.policy.prewake import PrewakeLearner
from autosleepd.policy.schedule import Schedule
from autosleepd.control.engine import EngineUnreachable
from autosleepd.control.states import State
from autosleepd.control.supervisor import OrderFailed

from .conftest import FakeEngine, eventually, settle

UTC = ZoneInfo("UTC")
PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")


def at(text: str, zone: ZoneInfo = UTC) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


# ----- schedules ------------------------------------------------------------------------------

def test_a_weekday_window_in_its_own_time_zone():
    schedule = Schedule.parse("Mon-Fri 08:00-19:00", "Europe/Paris")
    assert schedule.active(at("2026-03-02 07:59", PARIS)) is None            # a Monday
    window, end = schedule.active(at("2026-03-02 08:00", PARIS))
    assert end == at("2026-03-02 19:00", PARIS) and window.text == "Mon-Fri 08:00-19:00"
    assert schedule.active(at("2026-03-07 10:00", PARIS)) is None            # Saturday
    assert schedule.active(at("2026-03-02 07:30", UTC)) is not None          # 08:30 in Paris


def test_a_window_across_midnight_belongs_to_the_day_it_starts():
    schedule = Schedule.parse("Fri 22:00-02:00")
    assert schedule.active(at("2026-03-07 01:59"))[1] == at("2026-03-07 02:00")   # Saturday night
    assert schedule.active(at("2026-03-07 02:00")) is None
    assert schedule.active(at("2026-03-06 01:00")) is None                        # Friday morning


def test_the_next_start_wraps_the_week_and_day_ranges_wrap_too():
    schedule = Schedule.parse("Sat-Mon 09:00-10:00, Wed 12:00-13:00")
    assert schedule.next_start(at("2026-03-05 12:00"))[1] == at("2026-03-07 09:00")   # Thu -> Sat
    assert schedule.active(at("2026-03-08 09:30")) is not None                        # Sunday
    assert schedule.next_start(at("2026-03-09 11:00"))[1] == at("2026-03-11 12:00")   # Mon -> Wed


def test_windows_keep_their_local_hours_across_daylight_saving():
    schedule = Schedule.parse("daily 08:00-09:00", "America/New_York")
    # 2026-03-08: clocks spring forward in New York.
    assert schedule.next_start(at("2026-03-07 12:00", NEW_YORK))[1] == at("2026-03-08 08:00", NEW_YORK)
    assert schedule.next_start(at("2026-03-08 12:00", NEW_YORK))[1] == at("2026-03-09 08:00", NEW_YORK)


@pytest.mark.parametrize("text", ["Mon-Fri", "Mon-Fri 8-19", "Funday 08:00-19:00", "Monkey 08:00-09:00",
                                  "Mon 25:00-26:00", "Mon 08:00-08:61"])
def test_a_malformed_schedule_names_the_part(text):
    with pytest.raises(ValueError):
        Schedule.parse(text)


@pytest.mark.parametrize("name, value", [
    ("AUTOSLEEPD_KEEP_AWAKE", "weekdays 9 to 5"), ("AUTOSLEEPD_LADDER", "5m:2,2h:1"),
    ("AUTOSLEEPD_LADDER", "soon:1"), ("AUTOSLEEPD_TIMEZONE", "Mars/Olympus"),
    ("AUTOSLEEPD_PREWAKE", "psychic"), ("AUTOSLEEPD_STATE_FILE", "relative.json"),
])
def test_a_malformed_policy_setting_names_the_variable(name, value):
    with pytest.raises(ConfigError) as error:
        Config.from_env({name: value})
    assert error.value.name == name and repr(value) in str(error.value)


def test_a_ladder_and_an_idle_timeout_cannot_both_be_set():
    with pytest.raises(ConfigError, match="either a ladder or AUTOSLEEPD_IDLE_TIMEOUT"):
        Config.from_env({"AUTOSLEEPD_LADDER": "5m:1,2h:2", "AUTOSLEEPD_IDLE_TIMEOUT": "10m"})
    config = Config.from_env({"AUTOSLEEPD_LADDER": "5m:1,2h:2"})
    assert (config.idle_timeout, config.sleep_level) == (300, 1)
    assert Ladder.parse("5m:1,2h:2", parse_duration).deeper(1) == (7200, 2)
    for typo in ("2s:1,,4s:2", "5m:1,", ",5m:1"):   # a rung lost to a typo is not guessed at
        with pytest.raises(ConfigError, match="AUTOSLEEPD_LADDER.*empty rung"):
            Config.from_env({"AUTOSLEEPD_LADDER": typo})


# ----- the learner ----------------------------------------------------------------------------

def test_the_learner_plans_a_wake_before_the_usual_first_request_and_remembers_it(tmp_path):
    learner = PrewakeLearner(UTC, lead=120, path=tmp_path / "state.json")
    for day in ("2026-03-02", "2026-03-09"):                 # two Mondays
        learner.record_resumption(at(f"{day} 09:00"))
        learner.record_resumption(at(f"{day} 09:04"))
    plan = learner.plan(at("2026-03-15 20:00"))              # Sunday evening
    assert plan.at == at("2026-03-16 08:58") and plan.bucket == "0-9"
    assert "Mon 09:00" in plan.reason
    again = PrewakeLearner(UTC, lead=120, path=tmp_path / "state.json")   # after a restart
    assert again.plan(at("2026-03-15 20:00")).at == plan.at


def test_one_week_is_not_a_habit():
    learner = PrewakeLearner(UTC)
    learner.record_resumption(at("2026-03-02 09:00"))
    assert learner.plan(at("2026-03-03 00:00")) is None


def test_the_learner_backs_off_when_its_wakes_go_unused_and_returns_when_traffic_does():
    learner = PrewakeLearner(UTC)
    for day in ("2026-03-02", "2026-03-09"):
        learner.record_resumption(at(f"{day} 09:00"))
    learner.judge("0-9", used=False)
    assert learner.plan(at("2026-03-15 20:00")) is not None   # one miss is not a pattern
    learner.judge("0-9", used=False)
    assert learner.plan(at("2026-03-15 20:00")) is None       # mostly wasted: stop
    learner.record_resumption(at("2026-03-16 09:10"))         # traffic came there by itself
    assert learner.plan(at("2026-03-22 20:00")) is not None
    assert (learner.used, learner.wasted) == (0, 2)


def test_a_damaged_state_file_is_forgotten(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    learner = PrewakeLearner(UTC, path=path)
    assert learner.resumptions == [] and learner.plan(at("2026-03-02 00:00")) is None


# ----- the supervisor with a policy ------------------------------------------------------------

class Guard:
    """A memory guard at the boundary: says whether the GPU has room."""

    def __init__(self, room: bool = True):
        self.room = room

    async def shortfall(self):
        if self.room:
            return None
        return Shortfall(GpuMemory(0, "GPU-0", 80 * 2**30, 79 * 2**30), 40 * 2**30, ((77, 60 * 2**30),))

    async def learn(self, awake): ...
    async def before_sleep(self): ...
    async def after_sleep(self, level): return None
    def level_for_sleep(self, level): return level, None
    async def read(self): return [], set()
    def engine_gpus(self, gpus, pids): return []
    def status(self): return {}


@pytest.fixture
async def rig(supervisors):
    async def make(wall: str, engine: FakeEngine | None = None, guard=None, learner=None, **settings):
        config = Config.from_env({f"AUTOSLEEPD_{k.upper()}": v for k, v in settings.items()})
        config = dataclasses.replace(config, probe_interval=3600)
        engine = engine or FakeEngine()
        clock = ManualClock(wall_start=at(wall))
        return await supervisors(config, engine, clock, guard=guard, learner=learner), engine, clock

    return make


async def advance_to(clock: ManualClock, wall: float) -> None:
    """Let time pass up to ``wall``, an hour at most at a time, as it would for real."""
    while clock.wall() < wall:
        clock.advance(min(3600.0, wall - clock.wall()))
        await settle()


async def test_a_keep_awake_window_blocks_sleep_and_pre_wakes_at_its_start(rig):
    supervisor, engine, clock = await rig("2026-03-02 07:00", idle_timeout="5m",   # Monday
                                          keep_awake="Mon-Fri 08:00-19:00")
    await advance_to(clock, at("2026-03-02 07:05"))
    assert supervisor.state is State.ASLEEP                          # outside the window
    assert "keep-awake window starts" in supervisor.status().to_json()["next_transition"]["what"]
    await advance_to(clock, at("2026-03-02 07:59:59"))
    assert engine.count("wake") == 0
    await advance_to(clock, at("2026-03-02 08:00"))
    assert supervisor.state is State.AWAKE and engine.count("wake") == 1   # before any user
    assert supervisor.stats.prewakes == 1
    await advance_to(clock, at("2026-03-02 15:00"))                  # idle for hours, in the window
    assert supervisor.state is State.AWAKE and engine.count("sleep") == 1
    assert "window Mon-Fri 08:00-19:00 ends" in supervisor.status().to_json()["next_transition"]["what"]
    await advance_to(clock, at("2026-03-02 19:00"))
    assert supervisor.state is State.ASLEEP and engine.count("sleep") == 2


async def test_a_request_inside_a_window_is_served_and_the_window_still_holds(rig):
    supervisor, engine, clock = await rig("2026-03-02 12:00", idle_timeout="5m",
                                          keep_awake="Mon-Fri 08:00-19:00")
    await supervisor.admit()
    supervisor.release()
    await advance_to(clock, at("2026-03-02 18:00"))
    assert supervisor.state is State.AWAKE and engine.count("sleep") == 0


async def test_a_neighbour_cannot_evict_an_engine_inside_its_keep_awake_window(rig):
    supervisor, engine, clock = await rig("2026-03-02 12:00", idle_timeout="0",
                                          keep_awake="Mon-Fri 08:00-19:00")
    with pytest.raises(OrderFailed, match="keep-awake"):
        await supervisor.order_evict()
    await advance_to(clock, at("2026-03-02 20:00"))
    await supervisor.order_evict()
    assert supervisor.state is State.ASLEEP


async def test_the_ladder_goes_to_level_one_then_wakes_and_sleeps_at_level_two(rig):
    supervisor, engine, clock = await rig("2026-03-02 00:00", guard=Guard(room=True), ladder="5m:1,2h:2")
    await advance_to(clock, at("2026-03-02 00:05"))
    assert supervisor.state is State.ASLEEP and supervisor.asleep_level == 1
    assert "level 2" in supervisor.status().to_json()["next_transition"]["what"]
    await advance_to(clock, at("2026-03-02 01:59"))
    assert engine.calls.count(("sleep", 2)) == 0
    await advance_to(clock, at("2026-03-02 02:00"))
    calls = [c for c in engine.calls if c[0] in ("sleep", "wake")]
    assert calls == [("sleep", 1), ("wake", 1), ("sleep", 2)]
    assert supervisor.state is State.ASLEEP and supervisor.asleep_level == 2
    assert supervisor.stats.ladder_steps == 1
    await supervisor.admit()                                          # the next user wakes level 2
    assert ("wake", 2) in engine.calls


async def test_the_ladder_skips_its_step_when_the_gpu_has_no_room(rig):
    guard = Guard(room=False)
    supervisor, engine, clock = await rig("2026-03-02 00:00", guard=guard, ladder="5m:1,2h:2")
    await advance_to(clock, at("2026-03-02 02:00"))
    assert supervisor.asleep_level == 1 and engine.count("wake") == 0
    assert supervisor.stats.ladder_skips == 1
    guard.room = True
    await advance_to(clock, at("2026-03-02 02:04"))
    assert engine.count("wake") == 0                                 # retried 5 minutes later
    await advance_to(clock, at("2026-03-02 02:05"))
    assert supervisor.asleep_level == 2 and supervisor.stats.ladder_steps == 1



async def test_a_ladder_step_without_room_does_not_keep_the_engine_from_its_stop_rung(rig):
    engine = FakeEngine()
    supervisor, engine, clock = await rig("2026-03-02 00:00", engine=engine, guard=Guard(room=False),
                                          ladder="5m:1,2h:2,150m:stop",
                                          engine_stop_command="true", engine_start_command="true")
    await advance_to(clock, at("2026-03-02 02:29"))
    assert supervisor.asleep_level == 1 and supervisor.stats.ladder_skips >= 1
    engine.fail("is_sleeping", EngineUnreachable("connection refused"), times=1000)   # once stopped
    await advance_to(clock, at("2026-03-02 02:30"))
    await eventually(lambda: supervisor.state is State.STOPPED, what="stopped at the stop rung")

async def test_the_ladder_never_deepens_while_requests_wait(rig):
    engine = FakeEngine()
    supervisor, engine, clock = await rig("2026-03-02 00:00", engine=engine, guard=Guard(), ladder="5m:1,2h:2")
    await advance_to(clock, at("2026-03-02 01:59:59"))
    gate = engine.block("wake")
    held = asyncio.create_task(supervisor.admit())   # a user arrives just before the step
    await settle()
    await advance_to(clock, at("2026-03-02 02:00"))
    gate.set()
    await held
    assert engine.calls.count(("sleep", 2)) == 0 and supervisor.state is State.AWAKE


async def test_the_learned_pre_wake_on_weeks_of_traffic(rig):
    """Two weeks of weekday traffic starting at 09:00; then the pre-wake; then it stops paying."""
    learner = PrewakeLearner(UTC, lead=120)
    supervisor, engine, clock = await rig("2026-03-02 00:00", learner=learner, idle_timeout="5m",
                                          prewake="learned")

    async def morning_traffic(day: str) -> None:
        await advance_to(clock, at(f"{day} 09:00"))
        await supervisor.admit()
        supervisor.release()
        await advance_to(clock, at(f"{day} 09:30"))                 # idle again, then asleep
        assert supervisor.state is State.ASLEEP

    for week in ("2026-03-02", "2026-03-09"):
        for offset in range(5):
            await morning_traffic(datetime.fromisoformat(week).replace(day=int(week[-2:]) + offset)
                                  .strftime("%Y-%m-%d"))
    wakes = engine.count("wake")
    assert wakes == 10 and supervisor.stats.prewakes == 0          # learning, not yet acting
    await advance_to(clock, at("2026-03-16 08:57:59"))
    assert supervisor.state is State.ASLEEP
    await advance_to(clock, at("2026-03-16 08:58"))
    assert supervisor.state is State.AWAKE and supervisor.stats.prewakes == 1
    await advance_to(clock, at("2026-03-16 09:00"))
    await supervisor.admit()                                          # the user finds it awake
    supervisor.release()
    assert engine.count("wake") == wakes + 1 and learner.used == 1
    # Then the traffic stops: two Mondays of wasted pre-wakes, and the third Monday gets none.
    for monday in ("2026-03-23", "2026-03-30"):
        await advance_to(clock, at(f"{monday} 08:58"))
        assert supervisor.state is State.AWAKE
        await advance_to(clock, at(f"{monday} 09:10"))
        assert supervisor.state is State.ASLEEP
    assert learner.outcomes["0-9"] == [True, False, False]   # Tuesday to Friday went the same way
    await advance_to(clock, at("2026-04-06 00:00"))
    prewakes = supervisor.stats.prewakes
    await advance_to(clock, at("2026-04-06 09:10"))
    assert supervisor.stats.prewakes == prewakes and supervisor.state is State.ASLEEP
