"""The vLLM client against the simulator on real sockets: the API key, the wake's steps and
deadline, the fingerprint; and the simulator's engine-truth faults."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from autosleepd.control.engine import (EngineAuthError, EngineClient, EngineNonsense,
                                       EngineTimeout, Fingerprint)
from autosleepd.sim import SimSettings, SimulatedEngine, expected_text
from autosleepd.sim.gpu import GiB, SimGpu

from .conftest import completion, eventually

KEY = "sk-engine-7f3a9c"


@pytest.fixture
async def client():
    clients: list[EngineClient] = []

    async def make(url: str, api_key: str | None = None) -> EngineClient:
        engine = EngineClient(url, connect_timeout=2.0, api_key=api_key)
        await engine.start()
        clients.append(engine)
        return engine

    yield make
    for engine in clients:
        await engine.close()


async def sleep_and_wake(sim: SimulatedEngine, engine: EngineClient, level: int) -> None:
    await engine.sleep(level, timeout=5)
    await engine.wake(level, timeout=5)


# ----- the API key -----------------------------------------------------------------------------

async def test_the_key_reaches_the_engine_on_our_own_calls_and_control_calls_need_none(make_sim, client):
    sim = await make_sim(api_key=KEY)
    engine = await client(sim.url, api_key=KEY)
    await engine.check_inference(timeout=5)
    assert (await engine.fingerprint(timeout=5)).source == "token_ids"
    await sleep_and_wake(sim, engine, 1)   # control calls are open, as with vLLM
    assert not await engine.is_sleeping()
    assert sim.stats.served == 2


@pytest.mark.parametrize("sent", [None, "sk-wrong-key-1234"])
async def test_a_refused_key_says_which_variable_to_set_and_never_shows_a_key(make_sim, client, sent):
    sim = await make_sim(api_key=KEY)
    engine = await client(sim.url, api_key=sent)
    for call in (engine.check_inference, engine.fingerprint):
        with pytest.raises(EngineAuthError) as error:
            await call(timeout=5)
        message = str(error.value)
        assert error.value.status == 401 and "AUTOSLEEPD_UPSTREAM_API_KEY" in message
        assert KEY not in message and (sent is None or sent not in message)
    assert sim.stats.served == 0


async def test_the_simulator_guards_only_v1_with_its_key(make_sim, http):
    sim = await make_sim(api_key=KEY)
    async with http.post(sim.url + "/v1/completions", json=completion()) as response:
        assert response.status == 401
    async with http.get(sim.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status == 200
    for method, path in (("GET", "/health"), ("GET", "/is_sleeping"), ("GET", "/metrics"),
                         ("POST", "/sleep?level=1"), ("POST", "/wake_up")):
        async with http.request(method, sim.url + path) as response:
            assert response.status == 200, path


# ----- the wake: its steps and its one deadline ------------------------------------------------

async def test_a_level_2_wake_reports_each_step_with_its_duration(make_sim, client):
    sim = await make_sim(reload_seconds=0.2)
    engine = await client(sim.url)
    await engine.sleep(2, timeout=5)
    steps: list[tuple[str, float]] = []
    await engine.wake(2, timeout=5, on_step=lambda name, seconds: steps.append((name, seconds)))
    assert [name for name, _ in steps] == ["wake_up?tags=weights", "reload_weights",
                                          "wake_up?tags=kv_cache"]
    assert dict(steps)["reload_weights"] >= 0.2
    assert not await engine.is_sleeping() and sum(sim.stats.violations.values()) == 0


async def test_a_level_1_wake_is_one_step(make_sim, client):
    sim = await make_sim()
    engine = await client(sim.url)
    await engine.sleep(1, timeout=5)
    steps: list[str] = []
    await engine.wake(1, timeout=5, on_step=lambda name, seconds: steps.append(name))
    assert steps == ["wake_up"]


async def test_the_wake_timeout_bounds_the_whole_sequence_not_each_step(make_sim, client):
    # Each step fits in the timeout on its own; the three together do not.
    sim = await make_sim(wake_seconds=0.3, reload_seconds=0.3)
    engine = await client(sim.url)
    await engine.sleep(2, timeout=5)
    steps: list[str] = []
    started = asyncio.get_running_loop().time()
    with pytest.raises(EngineTimeout) as error:
        await engine.wake(2, timeout=0.5, on_step=lambda name, seconds: steps.append(name))
    assert asyncio.get_running_loop().time() - started < 0.9
    assert steps == ["wake_up?tags=weights"] and "reload_weights" in str(error.value)


# ----- the fingerprint -------------------------------------------------------------------------

@pytest.mark.parametrize("level", [1, 2])
async def test_the_fingerprint_is_the_same_across_healthy_wakes(make_sim, client, level):
    sim = await make_sim()
    engine = await client(sim.url)
    first = await engine.fingerprint(timeout=5)
    assert isinstance(first, Fingerprint) and first.source == "token_ids" and len(first) == 8
    for _ in range(3):
        await sleep_and_wake(sim, engine, level)
        assert await engine.fingerprint(timeout=5) == first


@pytest.mark.parametrize("level", [1, 2])
async def test_a_wake_that_answers_wrong_changes_the_fingerprint_while_health_says_200(
        make_sim, client, http, level):
    sim = await make_sim()
    engine = await client(sim.url)
    healthy = await engine.fingerprint(timeout=5)
    async with http.post(sim.url + "/sim/corrupt_next_wake") as response:
        assert response.status == 200
    await sleep_and_wake(sim, engine, level)
    wrong = await engine.fingerprint(timeout=5)
    assert wrong != healthy and wrong.source == "token_ids"
    async with http.get(sim.url + "/health") as response:
        assert response.status == 200
    await sim.restart()   # a fresh process answers right again
    assert await engine.fingerprint(timeout=5) == healthy


async def one_route_server(answer: dict):
    """An engine that answers every completion with ``answer``."""
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    async def completions(request: web.Request) -> web.Response:
        return web.json_response(answer)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_without_token_ids_the_fingerprint_compares_the_text_and_says_so(client):
    runner, url = await one_route_server({"choices": [{"text": " Paris is", "finish_reason": "length"}]})
    try:
        engine = await client(url)
        fingerprint = await engine.fingerprint(timeout=5)
        assert fingerprint.source == "text" and fingerprint.text == " Paris is"
        assert fingerprint == await engine.fingerprint(timeout=5)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("answer", [{"choices": []}, {"choices": [{"logprobs": {}}]}, {"id": "x"}])
async def test_a_malformed_fingerprint_answer_is_nonsense(client, answer):
    runner, url = await one_route_server(answer)
    try:
        engine = await client(url)
        with pytest.raises(EngineNonsense):
            await engine.fingerprint(timeout=5)
    finally:
        await runner.cleanup()


# ----- the simulator's other engine-truth behaviour ---------------------------------------------

async def test_a_request_that_reached_the_engine_asleep_behind_our_back_completes_after_the_wake(
        make_sim, http):
    sim = await make_sim()
    async with http.post(sim.url + "/sleep?level=1&mode=wait") as response:
        assert response.status == 200
    request = asyncio.create_task(http.post(sim.url + "/v1/completions", json=completion("a b", 3)))
    await eventually(lambda: len(sim._in_flight) == 1, what="the request inside the engine")
    assert not request.done()
    async with http.post(sim.url + "/wake_up") as response:
        assert response.status == 200
    async with await asyncio.wait_for(request, 5) as response:
        assert response.status == 200
        assert (await response.json())["choices"][0]["text"] == expected_text("a b", 3)


async def test_the_memory_left_asleep_grows_by_the_set_step_each_cycle_until_a_restart():
    gpu = SimGpu(total=80 * GiB)
    sim = SimulatedEngine(SimSettings(awake_bytes=40 * GiB, asleep_bytes=GiB,
                                      residue_step_bytes=GiB // 2), gpu=gpu)
    await sim.start()
    engine = EngineClient(sim.url)
    await engine.start()
    try:
        asleep = []
        for _ in range(3):
            await engine.sleep(1, timeout=5)
            asleep.append(gpu.holdings[sim.pid])
            await engine.wake(1, timeout=5)
        assert asleep == [int(1.5 * GiB), 2 * GiB, int(2.5 * GiB)]
        await sim.restart()
        await engine.sleep(1, timeout=5)
        assert gpu.holdings[sim.pid] == int(1.5 * GiB)
    finally:
        await engine.close()
        await sim.close()
