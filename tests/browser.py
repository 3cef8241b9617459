"""A headless Chromium driven over the DevTools protocol, with aiohttp as the websocket client.

``Browser.start()`` returns None where no chromium is installed; the caller skips with a message.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import tempfile
from pathlib import Path

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
_LISTENING_RE = re.compile(r"DevTools listening on (ws://\S+)")


def chromium() -> str | None:
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


class Browser:
    def __init__(self, process, session: aiohttp.ClientSession, socket, profile: str):
        self._process, self._session, self._socket, self._profile = process, session, socket, profile
        self._ids = itertools.count(1)

    @classmethod
    async def start(cls, width: int = 1280, height: int = 900) -> "Browser | None":
        binary = chromium()
        if binary is None:
            return None
        profile = tempfile.mkdtemp(prefix="autosleepd-chromium-")
        process = await asyncio.create_subprocess_exec(
            binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(30):
                while True:
                    line = (await process.stderr.readline()).decode(errors="replace")
                    if not line:
                        raise RuntimeError("chromium exited before listening for DevTools")
                    match = _LISTENING_RE.search(line)
                    if match:
                        break
            port = int(match.group(1).split(":")[2].split("/")[0])
            session = aiohttp.ClientSession()
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                pages = [t for t in await response.json() if t["type"] == "page"]
            socket = await session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        except BaseException:
            process.kill()
            await process.wait()
            shutil.rmtree(profile, ignore_errors=True)
            raise
        browser = cls(process, session, socket, profile)
        await browser.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                           deviceScaleFactor=1, mobile=False)
        return browser

    async def send(self, method: str, **params) -> dict:
        ident = next(self._ids)
        await self._socket.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        async with asyncio.timeout(30):
            async for message in self._socket:
                answer = json.loads(message.data)
                if answer.get("id") == ident:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer["result"]
        raise RuntimeError(f"{method}: the DevTools socket closed")

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, what: str | None = None):
        """Poll ``expression`` in the page until it is truthy; return its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or expression}")
            await asyncio.sleep(0.05)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        await self._socket.close()
        await self._session.close()
        self._process.kill()
        await self._process.wait()
        shutil.rmtree(self._profile, ignore_errors=True)
