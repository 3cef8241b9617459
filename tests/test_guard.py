"""The memory guard, end to end: real sidecars and real simulators sharing a simulated GPU that
behaves as measured (a wake into too little memory makes a zombie that keeps what it mapped).

The GPU and the process table are the simulator's (``SimGpu``, ``SimProcesses``): they stand in
for NVML and psutil at the boundary, and everything above them runs for real.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from autosleepd.gpu.neighbours import GpuLocks
from autosleepd.control.restart import CommandRestarter
from autosleepd.sim import SimSettings, SimulatedEngine, expected_text
from autosleepd.sim.gpu import GiB, SimGpu, SimProcesses
from autosleepd.control.states import State

from .conftest import eventually, post_completion


@pytest.fixture
async def rig(make_proxy):
    """Simulated engines on one simulated GPU, each with its own sidecar."""
    made: list[SimulatedEngine] = []

    class Rig:
        gpu = SimGpu(total=80 * GiB)
        processes = SimProcesses()

        async def engine(self, awake=50, asleep=2, weights=16, **settings) -> SimulatedEngine:
            sim = SimulatedEngine(SimSettings(awake_bytes=awake * GiB, asleep_bytes=asleep * GiB,
                                              weights_bytes=weights * GiB, **settings), gpu=self.gpu)
            await sim.start()
            made.append(sim)
            self.processes.add(sim)
            return sim

        async def sidecar(self, sim, **overrides):
            return await make_proxy(sim.url, gpu=self.gpu, processes=self.processes, **overrides)

    yield Rig()
    for sim in made:
        await sim.close()


async def test_enough_memory_wakes_at_once(rig, http):
    sim = await rig.engine()
    server = await rig.sidecar(sim)
    await server.supervisor.order_sleep(1)
    assert rig.gpu.free == 78 * GiB
    status, _ = await post_completion(http, server.url)
    assert status == 200 and server.supervisor.stats.memory_waits == 0
    assert server.supervisor.status().to_json()["memory"]["engine_awake_bytes"] == {"GPU-sim-0": 50 * GiB}


async def test_a_wake_waits_for_memory_and_goes_once_it_frees(rig, http):
    sim = await rig.engine()
    server = await rig.sidecar(sim, wake_timeout=10)
    await server.supervisor.order_sleep(1)
    rig.gpu.take(999, 60 * GiB)   # a training job takes the GPU meanwhile
    request = asyncio.create_task(post_completion(http, server.url, "patient"))
    await eventually(lambda: server.supervisor.status().to_json()["waiting_for_memory"] is not None)
    waiting = server.supervisor.status().to_json()["waiting_for_memory"]
    assert waiting["needed_bytes"] == 48 * GiB + 2**30 and waiting["free_bytes"] == 18 * GiB
    assert waiting["holders"][0] == {"pid": 999, "bytes": 60 * GiB}
    assert sim.stats.calls["/wake_up"] == 0
    rig.gpu.release_all(999)      # the job ends
    status, body = await request
    assert status == 200 and body["choices"][0]["text"] == expected_text("patient", 4)
    assert sim.stats.violations == {} and server.supervisor.stats.memory_waits == 1


async def test_never_enough_memory_gives_503_naming_the_shortfall_and_no_wake_is_sent(rig, http):
    sim = await rig.engine()
    server = await rig.sidecar(sim, wake_timeout=0.5)
    await server.supervisor.order_sleep(1)
    rig.gpu.take(999, 70 * GiB)
    async with http.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as response:
        assert response.status == 503 and response.headers["Retry-After"] == "30"
        error = (await response.json())["error"]
    assert error["code"] == "no_gpu_memory"
    assert "GPU 0" in error["message"] and "8.0 GiB free" in error["message"]
    assert "pid 999 (70.0 GiB)" in error["message"]
    await server.supervisor.wait_for(State.ASLEEP, timeout=5)
    assert sim.stats.calls["/wake_up"] == 0 and not sim.zombie
    async with http.get(server.url + "/autosleepd/engine-healthz") as response:
        assert response.status == 200   # safely asleep, not broken


async def test_an_explicit_wake_memory_overrides_what_was_learned(rig, http):
    sim = await rig.engine(awake=30)
    server = await rig.sidecar(sim, wake_memory=80 * GiB, wake_timeout=0.3)
    await server.supervisor.order_sleep(1)
    async with http.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as response:
        assert response.status == 503   # 78 GiB to map (+1 margin) with 78 free: refused
    assert sim.stats.calls["/wake_up"] == 0


async def test_a_wake_without_the_guard_makes_the_measured_zombie(rig, make_proxy, http):
    """The pitfall itself, reproduced: no guard, a wake into too little memory."""
    sim = await rig.engine()
    server = await make_proxy(sim.url, wake_timeout=1)   # no GPU reader: no guard
    await server.supervisor.order_sleep(1)
    rig.gpu.take(999, 60 * GiB)
    async with http.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "engine_broken"
    assert sim.zombie and sim.stats.violations["wake_without_memory"] == 1
    assert rig.gpu.holdings[sim.pid] == 20 * GiB   # it kept what it had mapped
    assert server.supervisor.state is State.BROKEN
    async with http.get(server.url + "/autosleepd/engine-healthz") as response:
        assert response.status == 503
        assert "out of memory" in (await response.json())["broken_reason"]
    async with http.get(server.url + "/autosleepd/healthz") as response:
        assert response.status == 200   # autosleepd itself is fine


async def test_a_broken_engine_is_restarted_with_backoff_and_held_work_served(rig, make_proxy, http):
    sim = await rig.engine()
    restarts = []

    async def restart() -> bool:
        restarts.append(time.monotonic())
        if len(restarts) == 2:       # the first restart brings back another zombie
            rig.gpu.release_all(999)
            await sim.restart()
        return True

    server = await make_proxy(sim.url, restart=restart, wake_timeout=30, restart_backoff=0.5)
    await server.supervisor.order_sleep(1)
    rig.gpu.take(999, 60 * GiB)
    request = asyncio.create_task(post_completion(http, server.url, "survivor"))
    await server.supervisor.wait_for(State.BROKEN, timeout=5)
    status, body = await asyncio.wait_for(request, 30)
    assert status == 200 and body["choices"][0]["text"] == expected_text("survivor", 4)
    assert len(restarts) == 2 and restarts[1] - restarts[0] >= 0.45   # one run per backoff step
    assert server.supervisor.stats.restarts == 2
    async with http.get(server.url + "/autosleepd/engine-healthz") as response:
        assert response.status == 200


# ----- the engine's processes hidden (a container without vLLM's PID namespace, a systemd
# dynamic user): the guard learns from whole-GPU readings around its own sleeps and wakes -------

async def test_with_the_engine_s_processes_hidden_the_guard_learns_from_the_device(rig, make_proxy, http):
    sim = await rig.engine(awake=50, asleep=2)
    server = await make_proxy(sim.url, gpu=rig.gpu, processes=SimProcesses(), wake_timeout=10)
    await server.supervisor.order_sleep(1)
    memory = server.supervisor.status().to_json()["memory"]
    assert memory["attribution"] == "device" and memory["last_freed_bytes"] == {"GPU-sim-0": 48 * GiB}
    rig.gpu.take(999, 60 * GiB)   # a job arrives while it sleeps: 18 GiB free
    request = asyncio.create_task(post_completion(http, server.url, "hidden"))
    await eventually(lambda: server.supervisor.status().to_json()["waiting_for_memory"] is not None)
    waiting = server.supervisor.status().to_json()["waiting_for_memory"]
    assert waiting["needed_bytes"] == 48 * GiB + GiB and waiting["free_bytes"] == 18 * GiB
    assert sim.stats.calls["/wake_up"] == 0
    rig.gpu.release_all(999)
    status, body = await request
    assert status == 200 and body["choices"][0]["text"] == expected_text("hidden", 4)
    assert sim.stats.violations == {} and not sim.zombie
    await eventually(lambda: server.supervisor.status().to_json()["memory"]["last_wake_mapped_bytes"]
                     == {"GPU-sim-0": 48 * GiB})   # read once the wake's check is done


async def test_a_neighbour_allocating_during_a_sleep_does_not_shrink_the_next_wake(rig, make_proxy, http):
    """Seen from the device, a sleep during which another process allocates looks small; the
    guard keeps what its last wake mapped, so the next wake still waits for the real amount."""
    sim = await rig.engine(awake=50, asleep=2, sleep_seconds=0.5)
    server = await make_proxy(sim.url, gpu=rig.gpu, processes=SimProcesses(), wake_timeout=0.5)
    await server.supervisor.order_sleep(1)
    assert (await post_completion(http, server.url))[0] == 200   # a wake that maps 48 GiB
    sleeping = asyncio.create_task(server.supervisor.order_sleep(1))
    await eventually(lambda: sim.stats.calls["/sleep"] == 2)
    rig.gpu.take(999, 28 * GiB)   # while the engine sleeps
    await sleeping
    assert server.supervisor.status().to_json()["memory"]["last_freed_bytes"] == {"GPU-sim-0": 20 * GiB}
    rig.gpu.take(999, 4 * GiB)    # 46 GiB free: enough for 20, not for 48
    async with http.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "no_gpu_memory"
    assert sim.stats.calls["/wake_up"] == 1 and not sim.zombie and sim.stats.violations == {}


async def test_the_restart_command_runs_in_a_shell_and_its_failure_is_reported():
    assert await CommandRestarter("echo restarting vllm")() is True
    assert await CommandRestarter("echo cannot >&2; exit 3")() is False
    assert await CommandRestarter("sleep 5", timeout=0.2)() is False


async def test_level_one_falls_back_to_level_two_when_host_ram_is_short(rig, http):
    sim = await rig.engine(weights=16)
    rig.processes.host_available = 10 * GiB
    server = await rig.sidecar(sim, weights_memory=16 * GiB)
    await server.supervisor.order_sleep(1)
    assert sim.level == 2 and sim.host_bytes == 0
    status, body = await post_completion(http, server.url, "reloaded")
    assert status == 200 and body["choices"][0]["text"] == expected_text("reloaded", 4)
    assert sim.stats.calls["/collective_rpc"] == 1 and sim.stats.violations == {}


async def test_level_one_is_refused_when_host_ram_is_short_and_fallback_is_off(rig, http):
    sim = await rig.engine(weights=16)
    rig.processes.host_available = 10 * GiB
    server = await rig.sidecar(sim, weights_memory=16 * GiB, level1_fallback="refuse")
    async with http.post(server.url + "/autosleepd/sleep") as response:
        assert response.status == 409
        assert "host RAM" in (await response.json())["error"]["message"]
    assert not sim.sleeping and server.supervisor.state is State.AWAKE


async def test_the_weights_size_is_learned_from_the_first_level_one_sleep(rig, http):
    sim = await rig.engine(weights=16)
    server = await rig.sidecar(sim)
    await server.supervisor.order_sleep(1)
    assert server.supervisor.status().to_json()["memory"]["weights_host_bytes"] == 16 * GiB
    assert (await post_completion(http, server.url))[0] == 200
    rig.processes.host_available = 8 * GiB
    await server.supervisor.order_sleep(1)
    assert sim.level == 2   # the next sleep knew it would not fit


# ----- several engines on one GPU ---------------------------------------------------------------

async def test_alternating_traffic_between_two_engines_evicts_the_idle_neighbour(rig, http, tmp_path):
    a = await rig.engine(awake=50)
    side_a = await rig.sidecar(a, coordination_dir=str(tmp_path), instance="a")
    await side_a.supervisor.order_sleep(1)
    b = await rig.engine(awake=40)   # fits only while a sleeps: 50 + 40 > 80
    with pytest.raises(RuntimeError, match="out of memory"):
        await rig.engine(awake=40)
    side_b = await rig.sidecar(b, coordination_dir=str(tmp_path), instance="b")
    for round_ in range(3):
        for name, server, sim in (("a", side_a, a), ("b", side_b, b)):
            status, body = await post_completion(http, server.url, f"{name} round {round_}")
            assert status == 200, body
            assert body["choices"][0]["text"] == expected_text(f"{name} round {round_}", 4)
            assert not sim.sleeping
    assert a.stats.violations == {} and b.stats.violations == {}
    assert not a.zombie and not b.zombie
    done = side_a.coordinator.evictions_done + side_b.coordinator.evictions_done
    assert done == 6   # every switch needed the other one asleep
    assert a.sleeping and not b.sleeping


async def test_three_engines_take_turns_and_the_least_recently_used_is_evicted(rig, http, tmp_path):
    sims = [await rig.engine(awake=30, asleep=1) for _ in range(2)]
    sides = [await rig.sidecar(sim, coordination_dir=str(tmp_path), instance=f"e{i}")
             for i, sim in enumerate(sims)]
    for side in sides:
        await side.supervisor.order_sleep(1)
    sims.append(await rig.engine(awake=30, asleep=1))
    sides.append(await rig.sidecar(sims[2], coordination_dir=str(tmp_path), instance="e2"))
    # 80 GiB holds two awake engines (60) and one asleep (1), not three awake (90).
    for turn in [0, 1, 2, 0, 1, 2]:
        status, _ = await post_completion(http, sides[turn].url, f"turn {turn}")
        assert status == 200
    assert all(sim.stats.violations == {} and not sim.zombie for sim in sims)
    # LRU: at the last turn (e2), e0 was used longest ago, so e0 was asked to sleep.
    assert sims[0].sleeping and not sims[1].sleeping and not sims[2].sleeping


async def test_a_busy_neighbour_is_never_evicted(rig, http, tmp_path):
    a = await rig.engine(awake=50)
    side_a = await rig.sidecar(a, coordination_dir=str(tmp_path), instance="a", wake_timeout=1)
    await side_a.supervisor.order_sleep(1)
    b = await rig.engine(awake=40, token_seconds=0.05)
    side_b = await rig.sidecar(b, coordination_dir=str(tmp_path), instance="b")
    stream = await http.post(side_b.url + "/v1/completions",
                             json={"prompt": "busy", "max_tokens": 10_000, "stream": True})
    await stream.content.readline()
    await eventually(lambda: side_b.supervisor.admission.in_flight == 1)
    async with http.post(side_a.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "no_gpu_memory"
    assert not b.sleeping and b.stats.calls["/sleep"] == 0
    assert a.stats.calls["/wake_up"] == 0 and a.stats.violations == {}
    stream.close()


async def test_a_dead_sidecar_s_stale_entry_is_ignored(rig, http, tmp_path):
    a = await rig.engine(awake=50)
    side_a = await rig.sidecar(a, coordination_dir=str(tmp_path), instance="a", wake_timeout=0.5)
    await side_a.supervisor.order_sleep(1)
    rig.gpu.take(999, 70 * GiB)   # held by an engine whose sidecar crashed a minute ago
    (tmp_path / "ghost.json").write_text(json.dumps({
        "instance": "ghost", "state": "awake", "in_flight": 0, "queued": 0, "gpus": ["GPU-sim-0"],
        "last_used": 0, "socket": str(tmp_path / "ghost.sock"), "updated": time.time() - 60}))
    assert side_a.coordinator.neighbours() == []
    async with http.post(side_a.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as response:
        assert response.status == 503
    assert side_a.coordinator.evictions_asked == 0 and a.stats.calls["/wake_up"] == 0


def test_gpu_locks_are_exclusive_between_takers(tmp_path):
    first, second = GpuLocks(tmp_path, ["GPU-b", "GPU-a"]), GpuLocks(tmp_path, ["GPU-a"])
    assert first.try_acquire()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()


async def test_two_sidecars_never_wake_into_the_same_free_memory(rig, http, tmp_path):
    a = await rig.engine(awake=50, wake_seconds=0.2)
    side_a = await rig.sidecar(a, coordination_dir=str(tmp_path), instance="a", wake_timeout=2)
    await side_a.supervisor.order_sleep(1)
    b = await rig.engine(awake=50, wake_seconds=0.2)
    side_b = await rig.sidecar(b, coordination_dir=str(tmp_path), instance="b", wake_timeout=2)
    await side_b.supervisor.order_sleep(1)
    # 76 GiB free, room for one wake of 48: both asked at once, the lock lets one through and
    # the other then sees the memory gone (and evicts the first, which is idle by then).
    results = await asyncio.gather(post_completion(http, side_a.url, "a"),
                                   post_completion(http, side_b.url, "b"))
    assert [status for status, _ in results] == [200, 200]
    assert a.stats.violations == {} and b.stats.violations == {}
    assert not a.zombie and not b.zombie
