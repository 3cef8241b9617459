"""The live page at /autosleepd/, in a real headless Chromium (skipped where none is installed):
it shows each engine's state, follows a state change without a reload, and its button wakes an
engine once given the admin token."""

from __future__ import annotations

import pytest

from .browser import Browser
from .conftest import eventually
from .test_one_port import TOKEN, rig  # noqa: F401  (rig: the fixture)

STATE_OF = "document.querySelector('[data-engine=\"{}\"] .state')?.dataset.state"


@pytest.fixture
async def browser():
    started = await Browser.start()
    if started is None:
        pytest.skip("chromium is not installed, so the live page's browser test cannot run "
                    "(Debian: apt-get install chromium; `make test` installs it when run as root)")
    yield started
    await started.close()


async def test_the_page_is_static_files_from_the_package_with_a_strict_policy(rig, http):  # noqa: F811
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    server = await rig.host(["a"], [alpha], gpu=False)
    async with http.get(server.url + "/autosleepd", allow_redirects=False) as response:
        assert response.status == 308 and response.headers["Location"] == "/autosleepd/"
    async with http.get(server.url + "/autosleepd/") as response:
        assert response.status == 200 and response.content_type == "text/html"
        assert response.headers["Content-Security-Policy"].startswith("default-src 'self'")
        page = await response.text()
    assert 'src="ui/app.js"' in page and "http" not in page.replace("http-equiv", "")
    async with http.get(server.url + "/autosleepd/ui/app.js") as response:
        assert response.status == 200 and '"host?history=1"' in await response.text()
    async with http.get(server.url + "/autosleepd/ui/secrets.txt") as response:
        assert response.status == 404


async def test_the_live_page_follows_the_engines_and_its_button_wakes_one(rig, http, browser):  # noqa: F811
    alpha = await rig.engine("alpha-model", shared_gpu=False)
    beta = await rig.engine("beta-model", shared_gpu=False, sleeping=True)
    server = await rig.host(["a", "b"], [alpha, beta], gpu=False)
    await browser.open(server.url + "/autosleepd/")
    await browser.wait_for(STATE_OF.format("a") + " === 'awake' && " + STATE_OF.format("b") + " === 'asleep'",
                           what="both engines shown with their states")
    assert await browser.evaluate("document.querySelectorAll('#timeline .row').length") == 2
    assert "alpha-model" in await browser.evaluate("document.querySelector('[data-engine=\"a\"]').innerText")

    # a state change shows up without a reload
    await browser.evaluate("window.notReloaded = true")
    await server.host.by_name["a"].supervisor.order_sleep(1)
    await browser.wait_for(STATE_OF.format("a") + " === 'asleep'", what="engine a shown asleep")
    assert await browser.evaluate("window.notReloaded") is True
    drawn = await browser.evaluate("[...document.querySelectorAll('#timeline .row')[0].querySelectorAll('.bar span')]"
                                   ".map(s => [s.className, s.getBoundingClientRect().width > 0])")
    states = [state for state, _ in drawn]   # falling_asleep shows once the history is read again
    assert states[:2] == ["starting", "awake"] and states[-1] == "asleep"
    assert all(visible for _, visible in drawn)   # drawn, not blocked by the page's own CSP

    # the Wake button asks for the token (a wrong one is asked again), then wakes the engine
    await browser.evaluate("document.querySelector('[data-engine=\"b\"] [data-action=\"wake\"]').click()")
    for token in ("not-the-token-at-all", TOKEN):
        await browser.wait_for("document.getElementById('token-dialog').open && "
                               "document.getElementById('token-input').value === ''",
                               what="the token dialog, empty")
        await browser.evaluate(f"document.getElementById('token-input').value = '{token}';"
                               "document.getElementById('token-ok').click()")
    await eventually(lambda: not beta.sleeping, what="engine b woken by the page's button")
    await browser.wait_for(STATE_OF.format("b") + " === 'awake'", what="engine b shown awake")
    assert await browser.evaluate("sessionStorage.getItem('autosleepd-admin-token')") == TOKEN
    assert await browser.evaluate("localStorage.length") == 0
    assert alpha.sleeping   # only b was woken
