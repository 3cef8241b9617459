"""The one client for vLLM's control calls. No policy: each call either succeeds or raises.

Parameters go in the query string only: vLLM ignores a JSON body on ``/sleep`` (two peer
projects shipped that bug and silently got level 1).
"""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp

# Each step of a wake, in order. A plain /wake_up after a level-2 sleep returns 200 and then
# answers garbage (vLLM #29341), so level 2 needs the weights reloaded between the two tags.
WAKE_STEPS = {
    1: (("POST", "/wake_up", None),),
    2: (("POST", "/wake_up?tags=weights", None),
        ("POST", "/collective_rpc", {"method": "reload_weights", "args": [], "kwargs": {}}),
        ("POST", "/wake_up?tags=kv_cache", None)),
}

_SLEEP_STATE_RE = re.compile(r'^vllm:engine_sleep_state\{[^}]*sleep_state="(\w+)"[^}]*\}\s+([0-9.eE+-]+)',
                             re.MULTILINE)
_LEVEL_OF_SLEEP_STATE = {"weights_offloaded": 1, "discard_all": 2}


class EngineError(Exception):
    """A control call that did not succeed."""


class EngineUnreachable(EngineError):
    """No connection, or the connection broke: the engine is down or still loading."""


class EngineRefused(EngineError):
    """The engine answered, but not with success."""

    def __init__(self, call: str, status: int, body: str):
        super().__init__(f"{call} answered {status}: {body[:300]}")
        self.status = status


class EngineAuthError(EngineRefused):
    """401 or 403 on autosleepd's own call: the engine runs with --api-key."""


class SleepUnsupported(EngineRefused):
    """404 on a control path: vLLM runs without VLLM_SERVER_DEV_MODE=1."""


class EngineNonsense(EngineError):
    """The engine answered 200 with something that does not follow the contract."""


class EngineClient:
    def __init__(self, base_url: str, connect_timeout: float = 5.0):
        self.base_url = base_url.rstrip("/")
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._model: str | None = None   # the served model, for the one-token check

    async def start(self) -> None:
        # Control calls must never queue behind proxied traffic, so they have their own pool.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, path: str, timeout: float,
                    payload: object = None) -> bytes:
        assert self._session is not None, "EngineClient.start() was not called"
        call = f"{method} {path}"
        limits = aiohttp.ClientTimeout(total=timeout, sock_connect=self._connect_timeout)
        try:
            async with self._session.request(method, self.base_url + path, json=payload,
                                             timeout=limits) as response:
                body = await response.read()
        except (aiohttp.ClientConnectionError, TimeoutError) as error:
            raise EngineUnreachable(f"{call}: {type(error).__name__}: {error}".rstrip(": ")) from None
        if response.status == 404:
            raise SleepUnsupported(call, 404, body.decode(errors="replace"))
        if response.status in (401, 403):
            raise EngineAuthError(call, response.status, body.decode(errors="replace"))
        if response.status >= 300:
            raise EngineRefused(call, response.status, body.decode(errors="replace"))
        return body

    async def is_sleeping(self, timeout: float = 5.0) -> bool:
        body = await self._call("GET", "/is_sleeping", timeout)
        try:
            value = json.loads(body)["is_sleeping"]
        except (ValueError, KeyError, TypeError):
            raise EngineNonsense(f"GET /is_sleeping answered {body[:200]!r}, "
                                 'expected {"is_sleeping": true|false}') from None
        if not isinstance(value, bool):
            raise EngineNonsense(f"GET /is_sleeping answered is_sleeping={value!r}, expected a boolean")
        return value

    async def sleep_level(self, timeout: float = 5.0) -> int | None:
        """The level a sleeping engine sleeps at, from vllm:engine_sleep_state; None if unknown."""
        try:
            text = (await self._call("GET", "/metrics", timeout)).decode(errors="replace")
        except EngineRefused:
            return None
        for state, value in _SLEEP_STATE_RE.findall(text):
            if state in _LEVEL_OF_SLEEP_STATE and float(value) > 0:
                return _LEVEL_OF_SLEEP_STATE[state]
        return None

    async def sleep(self, level: int, timeout: float) -> None:
        # mode=wait: a second guard behind our own drain, so vLLM never aborts a request.
        await self._call("POST", f"/sleep?level={level}&mode=wait", timeout)

    async def wake(self, level: int, timeout: float, on_step=None) -> None:
        """The wake steps in order; ``on_step(name, seconds)`` after each one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for method, path, payload in WAKE_STEPS[level]:
            started = loop.time()
            await self._call(method, path, max(0.001, deadline - started), payload)
            if on_step is not None:
                on_step(payload["method"] if payload else path.lstrip("/"), loop.time() - started)

    async def check_inference(self, timeout: float) -> None:
        """A one-token completion: proof that an engine reporting awake really serves."""
        if self._model is None:
            body = await self._call("GET", "/v1/models", timeout)
            try:
                self._model = json.loads(body)["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise EngineNonsense(f"GET /v1/models answered {body[:200]!r}, expected a model list") from None
        try:
            answer = await self._call("POST", "/v1/completions", timeout,
                                      {"model": self._model, "prompt": "ping", "max_tokens": 1})
        except EngineRefused:
            self._model = None   # a restarted engine may serve another name: ask again next time
            raise
        try:
            json.loads(answer)["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EngineNonsense(f"a one-token completion answered {answer[:200]!r}") from None
