"""The state machine driven directly: a fake engine at the edge, a manual clock, no sockets.

A five-minute idle window and a two-minute wake timeout are exercised in microseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from autosleepd.clock import ManualClock
from autosleepd.config import Config
from autosleepd.control.engine import EngineRefused, EngineUnreachable, SleepUnsupported
import itertools
from pathlib import Path

from autosleepd.control.states import REFUSED, TRANSITIONS, Event, State, next_state, table_markdown
from autosleepd.control.supervisor import OrderFailed, Refused

from .conftest import FakeEngine, settle


def config(**overrides) -> Config:
    defaults = dict(idle_timeout=300.0, wake_timeout=120.0, probe_interval=30.0, max_queue=1024)
    return dataclasses.replace(Config(), **{**defaults, **overrides})


@pytest.fixture
async def rig(supervisors):
    """(supervisor, engine, clock) with the control loop running; stopped afterwards."""

    async def make(engine: FakeEngine | None = None, **overrides):
        engine = engine or FakeEngine()
        clock = ManualClock()
        return await supervisors(config(**overrides), engine, clock), engine, clock

    return make


def test_every_state_and_event_pair_is_either_in_the_table_or_refused_on_purpose():
    for state, event in itertools.product(State, Event):
        in_table, refused = (state, event) in TRANSITIONS, (state, event) in REFUSED
        assert in_table != refused, f"({state.value}, {event.value}) is in neither table, or in both"
        if refused:
            with pytest.raises(AssertionError, match=event.value):
                next_state(state, event)
    reachable = {target for target in TRANSITIONS.values()} | {State.STARTING}
    assert reachable == set(State), "every state can be reached"


def test_the_readme_shows_the_transition_table_as_it_is():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert table_markdown() in readme, "regenerate the README table: python -m autosleepd.control.states"


async def test_five_minute_idle_window_puts_the_engine_to_sleep_exactly_on_time(rig):
    supervisor, engine, clock = await rig()
    assert supervisor.state is State.AWAKE
    clock.advance(299.9)
    await settle()
    assert supervisor.state is State.AWAKE and engine.count("sleep") == 0
    clock.advance(0.1)
    await settle()
    assert supervisor.state is State.ASLEEP
    assert engine.calls.count(("sleep", 1)) == 1


async def test_idle_timeout_zero_never_sleeps(rig):
    supervisor, engine, clock = await rig(idle_timeout=0)
    clock.advance(7 * 24 * 3600)
    await settle()
    assert supervisor.state is State.AWAKE and engine.count("sleep") == 0


async def test_work_in_flight_keeps_the_engine_awake_and_the_window_restarts_at_its_end(rig):
    supervisor, engine, clock = await rig()
    await supervisor.admit()
    clock.advance(3600)
    await settle()
    assert supervisor.state is State.AWAKE and supervisor.admission.in_flight == 1
    supervisor.release()
    clock.advance(299)
    await settle()
    assert supervisor.state is State.AWAKE
    clock.advance(1)
    await settle()
    assert supervisor.state is State.ASLEEP


async def test_many_held_requests_share_one_wake_and_go_through_in_arrival_order(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=1))
    assert supervisor.state is State.ASLEEP
    gate = engine.block("wake")
    order: list[int] = []

    async def work(i: int) -> None:
        await supervisor.admit()
        order.append(i)

    tasks = [asyncio.create_task(work(i)) for i in range(50)]
    await settle()
    assert supervisor.state is State.WAKING and supervisor.admission.queued == 50
    gate.set()
    await asyncio.gather(*tasks)
    assert order == list(range(50))
    assert engine.count("wake") == 1
    assert supervisor.admission.in_flight == 50 and supervisor.admission.queued == 0
    assert supervisor.status().to_json()["wakes"] == 1


async def test_a_level_two_sleep_is_woken_with_the_level_two_sequence(rig):
    supervisor, engine, clock = await rig(sleep_level=2)
    clock.advance(300)
    await settle()
    assert ("sleep", 2) in engine.calls and supervisor.state is State.ASLEEP
    await supervisor.admit()
    assert ("wake", 2) in engine.calls


async def test_the_level_of_an_engine_found_asleep_comes_from_the_engine(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=2), sleep_level=1)
    assert supervisor.state is State.ASLEEP and supervisor.asleep_level == 2
    await supervisor.admit()
    assert ("wake", 2) in engine.calls


async def test_a_held_request_gives_up_after_the_wake_timeout_with_503(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=1))
    engine.block("wake")   # a wake that hangs
    held = asyncio.create_task(supervisor.admit())
    await settle()
    clock.advance(119)
    await settle()
    assert not held.done()
    clock.advance(1)
    with pytest.raises(Refused) as refused:
        await held
    assert refused.value.reason == "wake_timeout"
    assert supervisor.admission.queued == 0 and supervisor.admission.in_flight == 0


async def test_the_queue_limit_refuses_the_request_past_it(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=1), max_queue=3)
    engine.block("wake")
    held = [asyncio.create_task(supervisor.admit()) for _ in range(3)]
    await settle()
    with pytest.raises(Refused) as refused:
        await supervisor.admit()
    assert refused.value.reason == "queue_full"
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)


async def test_a_held_client_that_goes_away_leaves_no_trace(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=1))
    gate = engine.block("wake")
    held = asyncio.create_task(supervisor.admit())
    await settle()
    assert supervisor.admission.queued == 1
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
    assert supervisor.admission.queued == 0
    gate.set()
    await settle()
    assert supervisor.admission.in_flight == 0 and supervisor.state is State.AWAKE
    clock.advance(300)
    await settle()
    assert supervisor.state is State.ASLEEP, "a cancelled hold must not keep the engine awake"


async def test_a_client_cancelled_right_after_release_gives_its_place_back(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=1))
    held = asyncio.create_task(supervisor.admit())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    # Released by the wake, then cancelled before it could run: in_flight must return to 0.
    await supervisor.wait_for(State.AWAKE, timeout=1)
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
    assert supervisor.admission.in_flight == 0


async def test_a_failed_wake_is_retried_with_backoff_and_then_succeeds(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=1))
    engine.fail("wake", EngineRefused("POST /wake_up", 500, "boom"), times=2)
    held = asyncio.create_task(supervisor.admit())
    await settle()
    assert engine.count("wake") == 1 and supervisor.state is State.WAKING
    clock.advance(0.25)
    await settle()
    assert engine.count("wake") == 2
    clock.advance(0.5)
    await held
    assert engine.count("wake") == 3 and supervisor.state is State.AWAKE
    assert supervisor.status().to_json()["wake_failures"] == 2


async def test_a_wake_that_keeps_failing_marks_the_engine_broken_and_stops_calling_it(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=1), wake_timeout=10)
    engine.fail("wake", EngineRefused("POST /wake_up", 500, "boom"), times=1000)
    held = asyncio.create_task(supervisor.admit())
    for _ in range(20):
        clock.advance(1)
        await settle()
    with pytest.raises(Refused) as refused:
        await held
    assert refused.value.reason == "engine_broken" and "boom" in refused.value.message
    assert supervisor.state is State.BROKEN and engine.count("wake") == 3
    clock.advance(600)
    await settle()
    assert engine.count("wake") == 3, "a broken engine is not woken again"


async def test_a_wake_that_fails_once_stops_when_nobody_waits_any_more(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=1))
    engine.fail("wake", EngineRefused("POST /wake_up", 500, "boom"), times=1)
    held = asyncio.create_task(supervisor.admit())
    await settle()
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
    clock.advance(1)
    await settle()
    assert supervisor.state is State.ASLEEP and engine.count("wake") == 1


async def test_a_failed_sleep_returns_to_awake_and_waits_another_idle_window(rig):
    supervisor, engine, clock = await rig()
    engine.fail("sleep", EngineRefused("POST /sleep", 500, "boom"))
    clock.advance(300)
    await settle()
    assert supervisor.state is State.AWAKE and engine.count("sleep") == 1
    clock.advance(299)
    await settle()
    assert engine.count("sleep") == 1
    clock.advance(1)
    await settle()
    assert supervisor.state is State.ASLEEP and engine.count("sleep") == 2


async def test_an_engine_without_sleep_endpoints_is_proxied_but_never_slept(rig):
    engine = FakeEngine()
    engine.fail("is_sleeping", SleepUnsupported("GET /is_sleeping", 404, "Not Found"))
    supervisor, engine, clock = await rig(engine)
    assert supervisor.state is State.AWAKE and not supervisor.sleep_supported
    clock.advance(3600)
    await settle()
    assert engine.count("sleep") == 0
    with pytest.raises(OrderFailed, match="VLLM_SERVER_DEV_MODE"):
        await supervisor.order_sleep(1)


async def test_an_unreachable_engine_is_retried_and_held_work_gets_502_at_its_deadline(rig):
    engine = FakeEngine()
    engine.fail("is_sleeping", EngineUnreachable("connection refused"), times=10_000)
    supervisor, engine, clock = await rig(engine, wake_timeout=30)
    assert supervisor.state is State.STARTING
    held = asyncio.create_task(supervisor.admit())
    await settle()
    for _ in range(30):
        clock.advance(1)
        await settle()
    with pytest.raises(Refused) as refused:
        await asyncio.wait_for(held, 5)
    assert refused.value.reason == "engine_unavailable"
    assert engine.count("is_sleeping") > 10


async def test_an_engine_that_comes_up_late_serves_the_work_held_meanwhile(rig):
    engine = FakeEngine()
    engine.fail("is_sleeping", EngineUnreachable("connection refused"), times=5)
    supervisor, engine, clock = await rig(engine)
    held = asyncio.create_task(supervisor.admit())
    for _ in range(10):
        clock.advance(1)
        await settle()
    await held
    assert supervisor.state is State.AWAKE and supervisor.admission.in_flight == 1


async def test_the_periodic_probe_notices_a_sleep_done_behind_autosleepd_s_back(rig):
    supervisor, engine, clock = await rig(probe_interval=30)
    engine.sleeping, engine.level = True, 1
    clock.advance(30)
    await settle()
    assert supervisor.state is State.ASLEEP
    await supervisor.admit()
    assert engine.count("wake") == 1


async def test_manual_sleep_drains_in_flight_work_first(rig):
    supervisor, engine, clock = await rig()
    await supervisor.admit()
    order = asyncio.create_task(supervisor.order_sleep(2))
    await settle()
    assert supervisor.state is State.FALLING_ASLEEP and engine.count("sleep") == 0
    late = asyncio.create_task(supervisor.admit())   # held: the drain admits nothing new
    await settle()
    assert not late.done()
    supervisor.release()
    await order
    assert engine.calls.count(("sleep", 2)) == 1
    await late   # then it wakes the engine again
    assert engine.count("wake") == 1


async def test_a_manual_sleep_whose_drain_times_out_leaves_the_engine_awake(rig):
    supervisor, engine, clock = await rig(drain_timeout=30)
    await supervisor.admit()
    order = asyncio.create_task(supervisor.order_sleep(1))
    await settle()
    clock.advance(30)
    with pytest.raises(OrderFailed, match="still in flight"):
        await order
    assert supervisor.state is State.AWAKE and engine.count("sleep") == 0


async def test_a_manual_sleep_stays_until_traffic(rig):
    supervisor, engine, clock = await rig()
    await supervisor.order_sleep(1)
    clock.advance(24 * 3600)
    await settle()
    assert supervisor.state is State.ASLEEP and engine.count("wake") == 0
    await supervisor.order_sleep(1)   # already asleep at that level: nothing is sent
    assert engine.count("sleep") == 1
    with pytest.raises(OrderFailed, match="level 1"):
        await supervisor.order_sleep(2)


async def test_manual_wake_and_the_idle_window_after_it(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=1))
    await supervisor.order_wake()
    assert supervisor.state is State.AWAKE and supervisor.admission.in_flight == 0
    clock.advance(300)
    await settle()
    assert supervisor.state is State.ASLEEP


async def test_work_arriving_during_a_slow_sleep_is_served_after_one_wake(rig):
    supervisor, engine, clock = await rig()
    gate = engine.block("sleep")
    clock.advance(300)
    await settle()
    assert supervisor.state is State.FALLING_ASLEEP
    held = [asyncio.create_task(supervisor.admit()) for _ in range(10)]
    await settle()
    assert engine.count("wake") == 0, "no wake while the sleep is in progress"
    gate.set()
    await asyncio.gather(*held)
    assert engine.count("sleep") == 1 and engine.count("wake") == 1


async def test_close_answers_held_requests_and_refuses_new_ones(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=1))
    engine.block("wake")
    held = asyncio.create_task(supervisor.admit())
    await settle()
    supervisor.close()
    with pytest.raises(Refused) as refused:
        await held
    assert refused.value.reason == "shutting_down"
    with pytest.raises(Refused):
        await supervisor.admit()


async def test_held_work_goes_at_once_and_an_engine_failing_the_one_token_check_is_broken(rig):
    engine = FakeEngine(sleeping=True, level=1)
    gate = engine.block("check_inference")
    engine.fail("check_inference", EngineRefused("POST /v1/completions", 500, "CUDA error"), times=100)
    supervisor, engine, clock = await rig(engine)
    await supervisor.admit()   # released once the engine reports awake, before the check ends
    await settle()
    assert supervisor.state is State.AWAKE and engine.count("check_inference") == 1
    gate.set()
    await settle()
    assert supervisor.state is State.BROKEN and "one-token" in supervisor.stats.broken_reason
    with pytest.raises(Refused) as refused:
        held = asyncio.create_task(supervisor.admit())
        await settle()
        clock.advance(120)
        await held
    assert refused.value.reason == "engine_broken"


async def test_with_the_state_check_only_no_completion_is_sent(rig):
    supervisor, engine, clock = await rig(FakeEngine(sleeping=True, level=1), wake_check="state")
    await supervisor.admit()
    await settle()
    assert supervisor.state is State.AWAKE and engine.count("check_inference") == 0
