"""One port for every engine of a host: routing by model, the host's model list, eviction between
engines of one process on a shared simulated GPU, pins and keep-alives.

Real simulators and one real autosleepd on loopback; the GPU is the simulator's (``SimGpu``).
"""

from __future__ import annotations

import asyncio
import socket
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs

from autosleepd.clock import ManualClock
from autosleepd.config import Config, ConfigError
from autosleepd.sim import SimSettings, SimulatedEngine, expected_text
from autosleepd.sim.gpu import GiB, SimGpu, SimProcesses
from autosleepd.control.states import State
from autosleepd.server import Autosleepd, StartError

from .conftest import FakeEngine, NoGpu, eventually, settle
from .test_observability import cli
from .test_policy import Guard


ROOT = Path(__file__).resolve().parent.parent
TOKEN = "0123456789abcdef0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def rig(make_proxy):
    """Simulated engines (on one simulated GPU when asked) behind one autosleepd port."""
    made: list[SimulatedEngine] = []

    class Rig:
        gpu = SimGpu(total=80 * GiB)
        processes = SimProcesses()

        async def engine(self, model: str, awake: int = 50, asleep: int = 2, shared_gpu: bool = True,
                         sleeping: bool = False, **settings) -> SimulatedEngine:
            sim = SimulatedEngine(SimSettings(model=model, awake_bytes=awake * GiB,
                                              asleep_bytes=asleep * GiB, **settings),
                                  gpu=self.gpu if shared_gpu else None)
            await sim.start()
            made.append(sim)
            self.processes.add(sim)
            if sleeping:   # asleep before autosleepd starts, so the next one fits
                async with aiohttp.ClientSession() as session:
                    async with session.post(sim.url + "/sleep?level=1") as response:
                        assert response.status == 200
            return sim

        async def host(self, names: list[str], sims: list[SimulatedEngine], gpu=True, **overrides):
            engines = tuple((name, sim.url) for name, sim in zip(names, sims))
            server = await make_proxy(sims[0].url, engines=engines, admin_token=TOKEN,
                                      gpu=self.gpu if gpu else None,
                                      processes=self.processes if gpu else None, **overrides)
            await eventually(lambda: all(e.models.names for e in server.host.engines),
                             what="every engine's model names")
            return server

    yield Rig()
    for sim in made:
        await sim.close()


async def ask(http, url: str, model: str | None, prompt: str = "hello", headers=None):
    body = {"prompt": prompt, "max_tokens": 4}
    if model is not None:
        body["model"] = model
    async with http.post(url + "/v1/completions", json=body, headers=headers) as response:
        return response.status, await response.json()


# ----- routing --------------------------------------------------------------------------------

async def test_two_engines_behind_one_port_each_get_their_model_s_requests(rig, http):
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False)
    for model, sim in (("beta-model", beta), ("alpha-model", alpha), ("beta-model", beta)):
        status, body = await ask(http, server.url, model, f"for {model}")
        assert status == 200 and body["model"] == model
        assert body["choices"][0]["text"] == expected_text(f"for {model}", 4)
    assert alpha.stats.calls["/v1/completions"] == 1 and beta.stats.calls["/v1/completions"] == 2
    # the engine's name is a model name too (before its /v1/models is read, say)
    assert (await ask(http, server.url, "b"))[0] == 200 and beta.stats.calls["/v1/completions"] == 3
    async with http.get(server.url + "/v1/models/alpha-model") as response:
        assert response.status == 200 and (await response.json())["id"] == "alpha-model"
    async with http.get(server.url + "/v1/models/gamma") as response:
        assert response.status == 404 and (await response.json())["error"]["code"] == "model_not_found"


async def test_the_body_reaches_the_engine_byte_for_byte(rig, http):
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False)
    raw = b'{ "max_tokens" : 3,\n  "model":"beta-model", "prompt": "caf\\u00e9 \xe2\x98\x95"}'
    async with http.post(server.url + "/v1/completions", data=raw,
                         headers={"Content-Type": "application/json", "Expect": "100-continue"}) as response:
        assert response.status == 200
    assert beta.stats.last_body == raw


async def test_an_audio_upload_is_routed_by_its_form_s_model_field(rig, http):
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False)
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF" + bytes(5000), filename="speech.wav", content_type="audio/wav")
    form.add_field("model", "beta-model")
    async with http.post(server.url + "/v1/audio/transcriptions", data=form) as response:
        await response.read()   # the simulator has no audio endpoint: what matters is who got it
    assert beta.stats.calls["/v1/audio/transcriptions"] == 1
    assert alpha.stats.calls["/v1/audio/transcriptions"] == 0


async def test_an_unknown_model_gets_404_listing_the_models_and_no_model_gets_400(rig, http):
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False)
    status, body = await ask(http, server.url, "gamma")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "'gamma'" in body["error"]["message"]
    assert "alpha-model, beta-model" in body["error"]["message"]
    status, body = await ask(http, server.url, None)
    assert status == 400 and body["error"]["code"] == "model_required"
    assert "'model' field" in body["error"]["message"]
    async with http.post(server.url + "/v1/completions", data=b'{"model": ',
                         headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400 and "not valid JSON" in (await response.json())["error"]["message"]
    async with http.post(server.url + "/sleep") as response:
        assert response.status == 403   # still blocked, whichever engine
    async with http.get(server.url + "/health") as response:
        assert response.status == 200   # a path that names no model: the first engine answers
    assert alpha.stats.calls["/v1/completions"] == beta.stats.calls["/v1/completions"] == 0


async def test_a_body_over_the_limit_is_refused_before_it_is_held(rig, http):
    alpha = await rig.engine("alpha-model", shared_gpu=False, sleeping=True)
    beta = await rig.engine("beta-model", shared_gpu=False)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False, max_body_size=1024)
    status, body = await ask(http, server.url, "alpha-model", "x" * 2000)
    assert status == 413 and "read whole to find their model" in body["error"]["message"]
    assert alpha.sleeping and alpha.stats.calls["/wake_up"] == 0


async def test_v1_models_lists_every_model_while_all_sleep_and_wakes_none(rig, http):
    alpha = await rig.engine("alpha-model", sleeping=True)
    beta = await rig.engine("beta-model", awake=40)
    server = await rig.host(["a", "b"], [alpha, beta])
    await server.host.by_name["b"].supervisor.order_sleep(1)
    async with http.get(server.url + "/v1/models") as response:
        assert response.status == 200
        listed = (await response.json())["data"]
    assert [(m["id"], m["engine"], m["state"]) for m in listed] == [
        ("alpha-model", "a", "asleep"), ("beta-model", "b", "asleep")]
    assert alpha.sleeping and beta.sleeping
    assert alpha.stats.calls["/wake_up"] == beta.stats.calls["/wake_up"] == 0


async def test_alternating_models_on_one_gpu_each_switch_evicts_the_other(rig, http):
    alpha = await rig.engine("alpha-model", awake=50, sleeping=True)
    beta = await rig.engine("beta-model", awake=40)      # 50 + 40 > 80: only one awake at a time
    # alpha was never seen awake: without the wake size, a wake could not be checked
    server = await rig.host(["a", "b"], [alpha, beta], wake_memory=50 * GiB)
    for round_ in range(3):
        for model, sim, other in (("alpha-model", alpha, beta), ("beta-model", beta, alpha)):
            status, body = await ask(http, server.url, model, f"{model} round {round_}")
            assert status == 200, body
            assert body["model"] == model
            assert body["choices"][0]["text"] == expected_text(f"{model} round {round_}", 4)
            assert not sim.sleeping and other.sleeping
    # nothing reached a sleeping engine (the simulator counts it), no wake ran out of memory
    assert alpha.stats.violations == {} and beta.stats.violations == {}
    assert not alpha.zombie and not beta.zombie
    assert sum(e.coordinator.evictions_done for e in server.host.engines) == 6


async def test_three_engines_behind_one_port_evict_the_least_recently_used(rig, http):
    sims = [await rig.engine(f"m{i}", awake=30, asleep=1, sleeping=i < 2) for i in range(3)]
    server = await rig.host(["e0", "e1", "e2"], sims, wake_memory=30 * GiB)
    # 80 GiB holds two awake engines (60) and one asleep, not three awake (90).
    for turn in [0, 1, 2, 0, 1, 2]:
        status, body = await ask(http, server.url, f"m{turn}", f"turn {turn}")
        assert status == 200 and body["model"] == f"m{turn}"
    assert all(sim.stats.violations == {} and not sim.zombie for sim in sims)
    assert sims[0].sleeping and not sims[1].sleeping and not sims[2].sleeping


# ----- pins and keep-alives ---------------------------------------------------------------------

async def pin(http, server, model: str, duration: str | None = None, headers=ADMIN):
    body = {"model": model} if duration is None else {"model": model, "duration": duration}
    async with http.post(server.url + "/autosleepd/pin", json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_a_pinned_engine_is_not_evicted_and_unpinning_lets_the_switch_happen(rig, http):
    alpha = await rig.engine("alpha-model", awake=50, sleeping=True)
    beta = await rig.engine("beta-model", awake=40)
    server = await rig.host(["a", "b"], [alpha, beta], wake_timeout=0.5, wake_memory=50 * GiB)
    status, answer = await pin(http, server, "beta-model", headers={})
    assert status == 401
    status, answer = await pin(http, server, "beta-model", "1h")
    assert status == 200 and answer["pin"]["in_seconds"] == 3600.0
    status, body = await ask(http, server.url, "alpha-model")
    assert status == 503 and body["error"]["code"] == "no_gpu_memory"
    assert not beta.sleeping and beta.stats.calls["/sleep"] == 0
    assert alpha.stats.calls["/wake_up"] == 0
    assert server.host.by_name["a"].coordinator.evictions_asked >= 1   # asked, and it refused
    async with http.post(server.url + "/autosleepd/unpin", json={"model": "beta-model"},
                         headers=ADMIN) as response:
        assert response.status == 200 and (await response.json())["pin"] is None
    status, body = await ask(http, server.url, "alpha-model")
    assert status == 200, body
    assert beta.sleeping and alpha.stats.violations == beta.stats.violations == {}


async def test_a_pin_blocks_the_idle_sleep_until_it_ends(rig, http):
    clock = ManualClock()
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False, clock=clock, idle_timeout=300)
    a, b = server.host.by_name["a"].supervisor, server.host.by_name["b"].supervisor
    assert (await pin(http, server, "alpha-model", "1h"))[0] == 200
    clock.advance(600)
    await b.wait_for(State.ASLEEP, timeout=5)      # the unpinned one sleeps on time
    assert a.state is State.AWAKE and not alpha.sleeping
    assert "pin until" in a.status().to_json()["next_transition"]["what"]
    assert await pin_gauges(http, server, "a") == (1.0, 3000.0)
    assert await pin_gauges(http, server, "b") == (0.0, 0.0)
    clock.advance(3000)
    await a.wait_for(State.ASLEEP, timeout=5)      # 3,600 s after the pin
    assert alpha.sleeping and a.pins.to_json(clock.now()) is None
    assert await pin_gauges(http, server, "a") == (0.0, 0.0)


async def pin_gauges(http, server, engine: str) -> tuple[float, float]:
    """autosleepd_pinned and autosleepd_pin_remaining_seconds, as scraped."""
    async with http.get(server.url + f"/autosleepd/metrics?engine={engine}") as response:
        lines = dict(line.split(" ", 1) for line in (await response.text()).splitlines()
                     if not line.startswith("#"))
    return float(lines["autosleepd_pinned"]), float(lines["autosleepd_pin_remaining_seconds"])


async def test_pinning_an_asleep_engine_wakes_it(rig, http):
    alpha = await rig.engine("alpha-model", shared_gpu=False, sleeping=True)
    beta = await rig.engine("beta-model", shared_gpu=False)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False)
    status, answer = await pin(http, server, "a")   # by engine name; no duration: until unpinned
    assert status == 200 and answer["pin"]["text"] == "pinned until unpinned"
    await server.host.by_name["a"].supervisor.wait_for(State.AWAKE, timeout=5)
    assert not alpha.sleeping
    assert await pin_gauges(http, server, "a") == (1.0, -1.0)


async def test_the_keep_alive_header_extends_that_engine_s_idle_window_within_its_bound(rig, http):
    clock = ManualClock()
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False, clock=clock, idle_timeout=300,
                            keep_alive_max=1800)
    a, b = server.host.by_name["a"].supervisor, server.host.by_name["b"].supervisor
    assert (await ask(http, server.url, "beta-model", headers={"X-Autosleepd-Keep-Alive": "10h"}))[0] == 200
    assert (await ask(http, server.url, "alpha-model"))[0] == 200
    assert b.pins.keep_alive == 1800                # asked 10 h, bounded by KEEP_ALIVE_MAX
    clock.advance(600)
    await a.wait_for(State.ASLEEP, timeout=5)
    assert b.state is State.AWAKE
    clock.advance(1300)
    await b.wait_for(State.ASLEEP, timeout=5)
    assert b.pins.keep_alive == 0                   # one awake spell only
    status, body = await ask(http, server.url, "beta-model", headers={"X-Autosleepd-Keep-Alive": "soon"})
    assert status == 400 and body["error"]["code"] == "bad_keep_alive"


# ----- configuration ----------------------------------------------------------------------------

def test_engines_are_read_from_one_variable_and_bad_ones_are_named():
    config = Config.from_env({"AUTOSLEEPD_ENGINES": "qwen=http://127.0.0.1:8000/, small=http://127.0.0.1:8001"})
    assert config.engines == (("qwen", "http://127.0.0.1:8000"), ("small", "http://127.0.0.1:8001"))
    assert config.upstream == "http://127.0.0.1:8000"
    for raw, said in (("qwen", "has no '='"), ("q=http://a:1,q=http://b:1", "given twice"),
                      ("q=ftp://x", "the URL of 'q'"), ("a b=http://x:1", "engine name 'a b'"),
                      ("a=http://x:1,b=http://x:1", "one URL per engine")):
        with pytest.raises(ConfigError, match="AUTOSLEEPD_ENGINES") as error:
            Config.from_env({"AUTOSLEEPD_ENGINES": raw})
        assert said in str(error.value)
    with pytest.raises(ConfigError, match="AUTOSLEEPD_UPSTREAM, not both"):
        Config.from_env({"AUTOSLEEPD_ENGINES": "a=http://x:1", "AUTOSLEEPD_UPSTREAM": "http://y:2"})
    for raw in ("a=http://u:secretpw@127.0.0.1:1,b=http://127.0.0.1:2",       # a password in a URL
                "a=http://u:secretpw@127.0.0.1:1,b=http://u:secretpw@127.0.0.1:1"):
        with pytest.raises(ConfigError, match="AUTOSLEEPD_ENGINES") as error:
            Config.from_env({"AUTOSLEEPD_ENGINES": raw})
        assert "secretpw" not in str(error.value) and "***@" in str(error.value)



async def test_every_control_line_names_its_engine_on_a_host_of_several(rig, http):
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False, sleeping=True)
    kept = structlog.get_config()["wrapper_class"]   # the suite logs warnings only
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            server = await rig.host(["a", "b"], [alpha, beta], gpu=False)
            assert (await ask(http, server.url, "beta-model"))[0] == 200   # wakes b
    finally:
        structlog.configure(wrapper_class=kept)
    transitions = [(line.get("engine"), line["to_state"]) for line in logs if line["event"] == "transition"]
    assert ("a", "awake") in transitions and ("b", "asleep") in transitions and ("b", "awake") in transitions
    assert all(engine in ("a", "b") for engine, _ in transitions)
    steps = [line for line in logs if line["event"] == "wake_step"]
    assert steps and all(line.get("engine") == "b" for line in steps)   # the wake procedure's lines

async def test_systemd_s_status_line_names_every_engine_s_state(rig, http, tmp_path, monkeypatch):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify.sock"))
    receiver.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False, sleeping=True)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False)
    assert (await ask(http, server.url, "beta-model"))[0] == 200   # wakes b
    await server.supervisor.order_sleep(1)                          # a sleeps when asked
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        while not seen or seen[-1] != "STATUS=engines a asleep (slept), b awake (woke)":
            message = (await loop.sock_recv(receiver, 4096)).decode()
            seen += [line for line in message.split("\n") if line.startswith("STATUS=")]
    assert "STATUS=engines a awake (found_awake), b asleep (found_asleep)" in seen
    receiver.close()


# ----- the host view ----------------------------------------------------------------------------

async def test_the_host_view_shows_each_engine_s_models_state_memory_use_held_work_and_plan(rig, http):
    alpha = await rig.engine("alpha-model", awake=50, sleeping=True, wake_seconds=0.3)
    beta = await rig.engine("beta-model", awake=20)
    server = await rig.host(["a", "b"], [alpha, beta], idle_timeout=300)
    assert (await pin(http, server, "beta-model", "2h"))[0] == 200
    held = asyncio.create_task(ask(http, server.url, "alpha-model", "held"))
    a = server.host.by_name["a"].supervisor
    await eventually(lambda: a.admission.queued == 1, what="the request held")
    async with http.get(server.url + "/autosleepd/host") as response:
        engines = {e["name"]: e for e in (await response.json())["engines"]}
    assert engines["a"]["models"] == ["alpha-model"] and engines["a"]["held"] == 1
    assert engines["a"]["state"] == "waking" and engines["a"]["upstream"] == alpha.url
    assert engines["b"]["state"] == "awake" and engines["b"]["pin"]["in_seconds"] == 7200.0
    assert engines["b"]["gpu_memory_awake_bytes"] == 20 * GiB
    assert "pin until" in engines["b"]["next_transition"]["what"]
    assert (await held)[0] == 200
    await server.host.by_name["a"].supervisor.order_sleep(2)
    await eventually(lambda: server.host.by_name["b"].power.watts is not None, what="a power reading")
    async with http.get(server.url + "/autosleepd/host?history=1") as response:
        engines = {e["name"]: e for e in (await response.json())["engines"]}
    assert engines["a"]["state"] == "asleep" and engines["a"]["sleep_level"] == 2
    assert engines["a"]["gpu_memory_awake_bytes"] == 50 * GiB
    assert engines["a"]["gpu_memory_asleep_bytes"] == 2 * GiB
    assert [h["state"] for h in engines["a"]["history"]] == [
        "starting", "asleep", "waking", "awake", "falling_asleep", "asleep"]
    assert "history" in engines["b"] and engines["a"]["pin"] is None
    assert engines["b"]["power"]["watts"] > 0 and engines["b"]["power"]["saved_wh"] == 0   # GPU draw


async def test_status_health_and_metrics_name_the_engine_on_a_host_of_several(rig, http):
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False, sleeping=True)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False)
    async with http.get(server.url + "/autosleepd/status") as response:
        assert response.status == 400 and "alpha-model, beta-model" in (await response.json())["error"]["message"]
    async with http.get(server.url + "/autosleepd/status?model=beta-model") as response:
        assert response.status == 200 and (await response.json())["state"] == "asleep"
    async with http.get(server.url + "/autosleepd/healthz") as response:
        assert (await response.json())["engines"] == {"a": "awake", "b": "asleep"}
    async with http.post(server.url + "/autosleepd/wake?model=b", headers=ADMIN) as response:
        assert response.status == 200 and not beta.sleeping
    async with http.get(server.url + "/autosleepd/metrics?engine=b") as response:
        assert response.status == 200
        assert 'autosleepd_wakes_total{level="1",reason="manual"} 1.0' in await response.text()
    async with http.get(server.url + "/autosleepd/metrics") as response:
        assert response.status == 400 and "?engine=" in (await response.json())["error"]["message"]


async def test_engine_health_names_the_broken_engine_so_only_it_is_restarted(rig, http):
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False, sleeping=True)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False, wake_timeout=0.5)
    beta.fail_next("/wake_up", body='{"error": {"message": "CUDA Error: out of memory", '
                                    '"type": "InternalServerError", "code": 500}}')
    async with http.post(server.url + "/autosleepd/wake?engine=b", headers=ADMIN) as response:
        assert response.status == 503
    await server.host.by_name["b"].supervisor.wait_for(State.BROKEN, timeout=5)
    for query, code in (("", 503), ("?engine=a", 200), ("?engine=b", 503), ("?engine=c", 404)):
        async with http.get(server.url + "/autosleepd/engine-healthz" + query) as response:
            assert response.status == code, query
    assert (await ask(http, server.url, "alpha-model"))[0] == 200   # the other engine serves on


async def test_ps_pin_and_unpin_on_the_command_line(rig, http):
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False, sleeping=True)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False, idle_timeout=300)
    env = {"AUTOSLEEPD_URL": server.url, "AUTOSLEEPD_ADMIN_TOKEN": TOKEN}
    code, out, _ = await cli("pin", "alpha-model", "1h", **env)
    assert code == 0 and out.startswith("a: the pin until ") and "(awake)" in out
    code, out, _ = await cli("ps", **env)
    header, row_a, row_b = out.splitlines()
    assert header.split()[:4] == ["ENGINE", "MODELS", "STATE", "LEVEL"]
    assert row_a.split()[:3] == ["a", "alpha-model", "awake"] and row_a.endswith("59m left")
    assert row_b.split()[:4] == ["b", "beta-model", "asleep", "1"] and row_b.endswith("-")
    code, out, _ = await cli("unpin", "a", **env)
    assert code == 0 and out == "a: not pinned (awake)\n"
    code, _, err = await cli("pin", "gamma", **env)
    assert code == 1 and "404" in err and "alpha-model, beta-model" in err
    code, _, err = await cli("pin", "beta-model", "soon", **env)
    assert code == 1 and "duration='soon' is invalid" in err
    assert server.host.by_name["b"].supervisor.pins.until is None



async def test_a_pin_until_unpinned_keeps_every_view_answering_and_a_pin_past_a_year_is_refused(rig, http):
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False, idle_timeout=300)
    env = {"AUTOSLEEPD_URL": server.url, "AUTOSLEEPD_ADMIN_TOKEN": TOKEN}
    code, out, _ = await cli("pin", "alpha-model", **env)
    assert code == 0 and "until unpinned" in out
    code, out, err = await cli("ps", **env)
    assert code == 0 and "until unpinned" in out, err
    async with http.get(server.url + "/autosleepd/status?model=alpha-model") as response:
        assert response.status == 200
        assert (await response.json())["next_transition"]["in_seconds"] is None
    async with http.get(server.url + "/autosleepd/metrics?engine=a") as response:
        assert "autosleepd_next_transition_seconds -1.0" in await response.text()
    code, _, err = await cli("pin", "beta-model", "100000000h", **env)
    assert code == 1 and "at most a year" in err
    assert server.host.by_name["b"].supervisor.pins.until is None
    assert not server._control.done()   # the control loops run on
    code, _, _ = await cli("pin", "alpha-model", **env)   # pinned again: still answers
    assert code == 0

# ----- pins as a planner input ------------------------------------------------------------------

async def test_a_pin_pre_empts_the_ladder_and_the_engine_goes_down_it_once_unpinned(supervisors):
    engine, clock = FakeEngine(), ManualClock()
    config = dataclasses.replace(Config.from_env({"AUTOSLEEPD_LADDER": "5m:1,1h:2"}), probe_interval=3600)
    supervisor = await supervisors(config, engine, clock, guard=Guard(room=True))
    clock.advance(300)
    await settle()
    assert supervisor.state is State.ASLEEP and engine.level == 1
    supervisor.pin(7200)
    await settle()
    assert supervisor.state is State.AWAKE and engine.count("wake") == 1   # pinned: woken
    for _ in range(6):                     # 1 h 40 idle: past both rungs, still pinned
        clock.advance(1000)
        await settle()
    assert supervisor.state is State.AWAKE and engine.count("sleep") == 1
    clock.advance(1200)                    # the pin ends, both rungs long past: down the ladder
    await settle()
    assert supervisor.state is State.ASLEEP and engine.level == 2
    assert [call[1] for call in engine.calls if call[0] == "sleep"] == [1, 1, 2]


async def test_a_host_that_cannot_make_its_coordination_directory_says_what_to_set(tmp_path, monkeypatch):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_directory))
    config = dataclasses.replace(Config(), host="127.0.0.1", port=0,
                                 engines=(("a", "http://127.0.0.1:9"), ("b", "http://127.0.0.1:10")))
    with pytest.raises(StartError, match="set AUTOSLEEPD_COORDINATION_DIR to a writable directory"):
        await Autosleepd(config, gpu=NoGpu()).start()


async def test_the_gpu_script_s_simulator_mode_passes_every_check(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bench" / "gpu_one_port.py"), "--sim", "--rounds", "1",
        "--out", str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, out.decode() + err.decode()
    result = json.loads((tmp_path / "gpu-one-port-sim-level1.json").read_text())
    assert result["pass"] and len(result["switches"]) == 2 and result["evictions_done"] >= 2
    assert "| every answer correct | yes |" in (tmp_path / "gpu-one-port-sim-level1.md").read_text()


async def test_a_model_two_engines_serve_goes_to_the_first_listed_with_a_warning(rig, http):
    first = await rig.engine("same-model", shared_gpu=False)
    second = await rig.engine("same-model", shared_gpu=False)
    with capture_logs() as logs:
        server = await rig.host(["a", "b"], [first, second], gpu=False)
    assert (await ask(http, server.url, "same-model"))[0] == 200
    assert first.stats.calls["/v1/completions"] == 1 and second.stats.calls["/v1/completions"] == 0
    warnings = [log for log in logs if log["event"] == "model_served_twice"]
    assert warnings and warnings[-1]["engines"] == ["a", "b"] and warnings[-1]["model"] == "same-model"
