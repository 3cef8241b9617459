"""autosleepd's own endpoints: status, health, manual sleep and wake with their credential."""

from __future__ import annotations

import pytest

from autosleepd.control.admin import _is_loopback
from autosleepd.sim import expected_text

from .conftest import post_completion

STATUS_FIELDS = {"state", "sleep_level", "idle_seconds", "in_flight", "queued", "sleeps", "wakes",
                 "last_sleep_seconds", "last_wake_seconds", "sleep_supported"}


async def test_status_reports_state_and_counts_as_they_change(make_sim, make_proxy, http):
    sim = await make_sim(sleep_seconds=0.05, wake_seconds=0.05)
    server = await make_proxy(sim.url)
    async with http.get(server.url + "/autosleepd/status") as response:
        status = await response.json()
    assert STATUS_FIELDS <= status.keys()
    assert status["state"] == "awake" and status["sleeps"] == 0
    async with http.post(server.url + "/autosleepd/sleep") as response:
        assert response.status == 200
        status = await response.json()
    assert status["state"] == "asleep" and status["sleeps"] == 1
    assert status["last_sleep_seconds"] >= 0.05
    async with http.post(server.url + "/autosleepd/wake") as response:
        status = await response.json()
    assert status["state"] == "awake" and status["wakes"] == 1 and status["last_wake_seconds"] >= 0.05


async def test_healthz_answers_whatever_the_engine_does(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    await sim.kill()
    async with http.get(server.url + "/autosleepd/healthz") as response:
        assert response.status == 200
    assert sim.stats.calls["/wake_up"] == 0


async def test_manual_control_needs_the_admin_token_when_one_is_set(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, admin_token="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        async with http.post(server.url + "/autosleepd/sleep", headers=headers) as response:
            assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert sim.stats.calls["/sleep"] == 0
    async with http.post(server.url + "/autosleepd/sleep?level=2",
                         headers={"Authorization": "Bearer s3cret"}) as response:
        assert response.status == 200 and (await response.json())["sleep_level"] == 2
    assert sim.level == 2


async def test_a_manual_sleep_lasts_until_traffic_wakes_the_engine(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url, idle_timeout=0)
    async with http.post(server.url + "/autosleepd/sleep") as response:
        assert response.status == 200
    status, body = await post_completion(http, server.url, "wake me")
    assert status == 200 and body["choices"][0]["text"] == expected_text("wake me", 4)
    assert sim.stats.violations == {}


@pytest.mark.parametrize("level", ["0", "3", "x"])
async def test_a_bad_level_is_refused_with_the_reason(make_sim, make_proxy, http, level):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    async with http.post(server.url + f"/autosleepd/sleep?level={level}") as response:
        assert response.status == 400
        assert "expected 1 or 2" in (await response.json())["error"]["message"]
    assert sim.stats.calls["/sleep"] == 0


async def test_an_unknown_admin_path_is_a_json_404_and_never_reaches_the_engine(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)
    async with http.get(server.url + "/autosleepd/nope") as response:
        assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
    assert sim.stats.calls["/autosleepd/nope"] == 0


def test_only_loopback_addresses_count_as_local():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("127.3.2.1")
    assert not _is_loopback("10.0.0.5") and not _is_loopback(None) and not _is_loopback("junk")


async def test_a_page_of_another_site_cannot_order_a_sleep_through_a_browser_on_the_host(make_sim, make_proxy, http):
    sim = await make_sim()
    server = await make_proxy(sim.url)   # no token: loopback clients may order
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "null"}, {"Origin": "http://localhost"}):
        async with http.post(server.url + "/autosleepd/sleep", headers=headers) as response:
            assert response.status == 403, headers
            assert (await response.json())["error"]["code"] == "cross_site"
    assert sim.stats.calls["/sleep"] == 0
    same_origin = {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}   # the live page
    async with http.post(server.url + "/autosleepd/sleep", headers=same_origin) as response:
        assert response.status == 200
    async with http.post(server.url + "/autosleepd/wake", headers={"Origin": server.url}) as response:
        assert response.status == 200   # a browser without fetch metadata: its origin is ours
    async with http.post(server.url + "/autosleepd/sleep") as response:
        assert response.status == 200
    async with http.post(server.url + "/autosleepd/wake") as response:   # curl sends no Origin
        assert response.status == 200
