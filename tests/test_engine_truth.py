"""The engine as it really is: slept, restarted or keyed behind autosleepd's back, waking wrong,
keeping more memory every cycle. Real simulators on loopback, and the state machine alone."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from autosleepd.clock import ManualClock
from autosleepd.config import Config
from autosleepd.control.engine import EngineTimeout
from autosleepd.control.interfaces import Observer
from autosleepd.control.states import State
from autosleepd.sim import SimSettings, SimulatedEngine, expected_text
from autosleepd.sim.gpu import GiB, SimGpu, SimProcesses

from .conftest import FakeEngine, completion, eventually, post_completion, settle


# ----- the state machine alone -----------------------------------------------------------------

def config(**overrides) -> Config:
    return dataclasses.replace(Config(), **{**dict(idle_timeout=300.0, probe_interval=30.0), **overrides})


async def test_work_stalled_on_an_engine_slept_behind_our_back_wakes_it(supervisors):
    engine, clock = FakeEngine(), ManualClock()
    supervisor = await supervisors(config(), engine, clock)
    await supervisor.admit()                  # forwarded; then the engine is slept by hand
    engine.sleeping, engine.level = True, 1
    supervisor.stalled()
    clock.advance(1.0)                        # at most one asked-for probe a second
    await settle()
    assert engine.count("wake") == 1 and supervisor.state is State.AWAKE
    assert supervisor.admission.in_flight == 1, "the stuck request is still in flight, now served"
    supervisor.release()
    assert supervisor.admission.in_flight == 0


async def test_failed_connects_to_an_engine_that_answers_probes_never_move_the_state(supervisors):
    engine, clock = FakeEngine(), ManualClock()
    supervisor = await supervisors(config(), engine, clock)
    probes = engine.count("is_sleeping")
    transitions = []

    class Transitions(Observer):
        def transition(self, *change):
            transitions.append(change)

    supervisor.add_observer(Transitions())
    for _ in range(100):                      # 10 s of connect failures, 10 a second
        supervisor.engine_unreachable("connection refused")
        clock.advance(0.1)
        await settle()
    assert transitions == [] and supervisor.state is State.AWAKE
    assert engine.count("is_sleeping") - probes <= 11, "at most one probe a second"


async def test_a_slow_wake_is_not_broken_and_a_held_client_gets_a_learned_retry_after(supervisors):
    engine, clock = FakeEngine(sleeping=True, level=1), ManualClock()
    supervisor = await supervisors(config(wake_timeout=1.0), engine, clock)
    gate = engine.block("wake")
    held = asyncio.create_task(supervisor.admit())
    await settle()
    clock.advance(1.0)
    with pytest.raises(Exception) as refused:
        await held
    assert refused.value.reason == "wake_timeout"
    clock.advance(300)                        # minutes: still waking, never broken, one wake call
    await settle()
    assert supervisor.state is State.WAKING and engine.count("wake") == 1
    gate.set()
    await settle()
    assert supervisor.state is State.AWAKE and supervisor.stats.broken_reason is None


# ----- real simulators -------------------------------------------------------------------------

async def test_with_the_engine_s_api_key_autosleepd_s_own_check_passes(make_sim, make_proxy, http):
    sim = await make_sim(api_key="sk-engine-key-0123456789")
    server = await make_proxy(sim.url, upstream_api_key="sk-engine-key-0123456789")
    for _ in range(3):
        await server.supervisor.order_sleep(1)
        async with http.post(server.url + "/v1/completions", json=completion(),
                             headers={"Authorization": "Bearer sk-engine-key-0123456789"}) as response:
            assert response.status == 200
    await eventually(lambda: sim.stats.calls["/v1/completions"] >= 6)   # 3 ours, 3 the client's
    status = server.supervisor.status()
    assert status.state is State.AWAKE and status.stats.config_error is None


async def test_without_the_engine_s_key_the_check_is_a_config_error_never_broken(make_sim, make_proxy, http):
    sim = await make_sim(api_key="sk-engine-key-0123456789")
    server = await make_proxy(sim.url)
    await server.supervisor.order_sleep(1)
    async with http.post(server.url + "/v1/completions", json=completion("keyed"),
                         headers={"Authorization": "Bearer sk-engine-key-0123456789"}) as response:
        assert response.status == 200   # the client's own key passes through untouched
        assert (await response.json())["choices"][0]["text"] == expected_text("keyed", 4)
    await eventually(lambda: server.supervisor.checker.config_error is not None)
    assert server.supervisor.state is State.AWAKE
    async with http.get(server.url + "/autosleepd/engine-healthz") as response:
        assert response.status == 200
    async with http.get(server.url + "/autosleepd/status") as response:
        body = await response.json()
    assert "AUTOSLEEPD_UPSTREAM_API_KEY" in body["config_error"]
    assert "sk-engine-key" not in str(body)
    async with http.get(server.url + "/autosleepd/metrics") as response:
        assert "autosleepd_config_error 1.0" in await response.text()


async def test_a_wake_that_answers_wrong_is_caught_rolled_back_and_the_held_work_served(
        make_sim, make_proxy, http):
    sim = await make_sim()
    restarts = []

    async def restart() -> bool:
        restarts.append(True)
        await sim.restart()
        return True

    server = await make_proxy(sim.url, wake_check="fingerprint", restart=restart, restart_backoff=0.2)
    await eventually(lambda: server.supervisor.checker.reference is not None)
    await server.supervisor.order_sleep(1)
    sim.corrupt_next_wake = True              # vLLM #53888: wrong output, /health 200
    status, body = await asyncio.wait_for(post_completion(http, server.url, "rolled back"), 20)
    assert status == 200 and body["choices"][0]["text"] == expected_text("rolled back", 4)
    assert restarts == [True]   # the wrong answer went only to the check, never to a client
    stats = server.supervisor.status().stats
    assert stats.check_failures == 1 and stats.broken_reason is None
    async with http.get(server.url + "/autosleepd/metrics") as response:
        assert "autosleepd_wake_check_failures_total 1.0" in await response.text()


async def test_healthy_wakes_never_trip_the_fingerprint(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, wake_check="fingerprint")
    await eventually(lambda: server.supervisor.checker.reference is not None)
    for level in (1, 2, 1, 2):
        await server.supervisor.order_sleep(level)
        assert (await post_completion(http, server.url))[0] == 200
    assert server.supervisor.stats.check_failures == 0 and server.supervisor.state is State.AWAKE


async def test_growing_leftover_memory_recycles_the_engine_while_asleep_and_idle(make_proxy, http):
    gpu, processes = SimGpu(total=80 * GiB), SimProcesses()
    sim = SimulatedEngine(SimSettings(awake_bytes=50 * GiB, asleep_bytes=2 * GiB,
                                      residue_step_bytes=GiB // 2), gpu=gpu)
    await sim.start()
    processes.add(sim)
    restarts = []

    async def restart() -> bool:
        restarts.append(server.supervisor.admission.idle and server.supervisor.state)
        await sim.restart()
        return True

    try:
        server = await make_proxy(sim.url, gpu=gpu, processes=processes, restart=restart,
                                  idle_timeout=0.2, recycle_residue_growth=GiB,
                                  restart_command="(the test's)")
        for _ in range(3):                    # 2.5, 3.0, then 3.5 GiB left: 1 GiB over the first
            await server.supervisor.wait_for(State.ASLEEP, timeout=5)
            assert (await post_completion(http, server.url))[0] == 200
        await eventually(lambda: server.supervisor.stats.recycles == 1, timeout=10)
        assert restarts == [State.UNAVAILABLE], "recycled while asleep, with nothing held"
        await server.supervisor.wait_for(State.ASLEEP, timeout=5)   # the fresh engine sleeps again
        assert sim.residue_bytes <= GiB // 2
        assert (await post_completion(http, server.url))[0] == 200
        status = server.supervisor.status().to_json()
        assert status["recycles"] == 1 and status["cycles"] >= 1
    finally:
        await sim.close()


async def test_an_engine_slept_by_hand_during_the_wake_check_is_found_asleep_not_broken(supervisors):
    """The operator's curl /sleep lands while the one-token check that follows a wake runs: the
    check fails (it hangs on the sleeping engine until its timeout, or is aborted). That is an
    engine asleep, woken again for the work stalled on it; not a broken one to restart (found by
    review)."""
    engine, clock = FakeEngine(sleeping=True, level=1), ManualClock()
    supervisor = await supervisors(config(), engine, clock)
    checking = engine.block("check_inference")
    await supervisor.admit()   # the request that wakes it
    await eventually(lambda: engine.count("check_inference") == 1, what="the wake's check")
    engine.sleeping, engine.level = True, 1
    engine.fail("check_inference", EngineTimeout("POST /v1/completions: no answer within 60s"))
    checking.set()
    await eventually(lambda: engine.count("wake") == 2, what="woken again for the stalled work")
    await settle()
    assert supervisor.state is State.AWAKE and supervisor.status().stats.check_failures == 0
    assert supervisor.admission.in_flight == 1


async def test_a_wake_check_hung_on_an_engine_slept_by_hand_is_given_up_within_a_second(supervisors):
    """The same sleep by hand, with the check hanging (vLLM holds requests to a sleeping engine):
    the engine's state is read meanwhile, so the loop is not stuck for the check's 60 s while
    every request stalls (found by review)."""
    engine, clock = FakeEngine(sleeping=True, level=1), ManualClock()
    supervisor = await supervisors(config(), engine, clock)
    engine.block("check_inference")   # never answers
    await supervisor.admit()
    await eventually(lambda: engine.count("check_inference") == 1, what="the wake's check")
    engine.sleeping, engine.level = True, 1
    clock.advance(1.0)
    await eventually(lambda: engine.count("wake") == 2, what="woken again for the stalled work")
    await settle()
    assert supervisor.state is State.AWAKE and supervisor.status().stats.check_failures == 0
