"""The one client for vLLM's control calls. No policy: each call either succeeds or raises.

Parameters go in the query string only: vLLM ignores a JSON body on ``/sleep`` (two peer
projects shipped that bug and silently got level 1).
"""

from __future__ import annotations

import json
import re
import time
from typing import Callable

import aiohttp

# Each step of a wake, in order, with the name it is reported by. A plain /wake_up after a
# level-2 sleep returns 200 and then answers garbage (vLLM #29341), so level 2 needs the weights
# reloaded between the two tags.
WAKE_STEPS = {
    1: (("wake_up", "POST", "/wake_up", None),),
    2: (("wake_up?tags=weights", "POST", "/wake_up?tags=weights", None),
        ("reload_weights", "POST", "/collective_rpc",
         {"method": "reload_weights", "args": [], "kwargs": {}}),
        ("wake_up?tags=kv_cache", "POST", "/wake_up?tags=kv_cache", None)),
}

# The fingerprint: a fixed prompt, greedy, a few tokens, read back as token ids. The ids, not the
# text: a tokenizer may decode many ids to nothing (the GPU test model's does).
FINGERPRINT_PROMPT = "The capital of France is"
FINGERPRINT_TOKENS = 8
_TOKEN_ID_RE = re.compile(r"^token_id:(\d+)$")
# vLLM's --api-key guards only these prefixes; the control endpoints stay open.
_GUARDED_PREFIXES = ("/v1/", "/v2/", "/inference/", "/cohere/")

_SLEEP_STATE_RE = re.compile(r'^vllm:engine_sleep_state\{[^}]*sleep_state="(\w+)"[^}]*\}\s+([0-9.eE+-]+)',
                             re.MULTILINE)
_LEVEL_OF_SLEEP_STATE = {"weights_offloaded": 1, "discard_all": 2}


class EngineError(Exception):
    """A control call that did not succeed."""


class EngineUnreachable(EngineError):
    """No connection, or the connection broke: the engine is down or still loading."""


class EngineTimeout(EngineUnreachable):
    """Connected, but no answer within the call's time (for a wake: the whole sequence's)."""


class EngineRefused(EngineError):
    """The engine answered, but not with success."""

    def __init__(self, call: str, status: int, body: str):
        super().__init__(f"{call} answered {status}: {body[:300]}")
        self.status = status


class SleepUnsupported(EngineRefused):
    """404 on a control path: vLLM runs without VLLM_SERVER_DEV_MODE=1."""


class EngineAuthError(EngineRefused):
    """401 or 403 on autosleepd's own /v1 call: a configuration error, not a broken engine."""

    def __init__(self, call: str, status: int, key_sent: bool):
        # vLLM's answer is not quoted: nothing here may ever carry the key.
        sent = "the key autosleepd sent was refused" if key_sent else "autosleepd sent none"
        EngineError.__init__(self, f"{call} answered {status}: vLLM wants its --api-key ({sent}); "
                                   "set AUTOSLEEPD_UPSTREAM_API_KEY or AUTOSLEEPD_UPSTREAM_API_KEY_FILE")
        self.status = status


class Fingerprint(tuple):
    """The fingerprint's token ids, compared as a tuple. ``source`` is "token_ids", or "text"
    when the engine returned no ids (then the tuple holds the text's code points)."""

    source: str
    text: str

    def __new__(cls, values, source: str, text: str) -> "Fingerprint":
        self = super().__new__(cls, values)
        self.source, self.text = source, text
        return self


class EngineNonsense(EngineError):
    """The engine answered 200 with something that does not follow the contract."""


class EngineClient:
    def __init__(self, base_url: str, connect_timeout: float = 5.0, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self._connect_timeout = connect_timeout
        self._api_key = api_key
        self._session: aiohttp.ClientSession | None = None
        self._model: str | None = None   # the served model, for the one-token check

    async def start(self) -> None:
        # Control calls must never queue behind proxied traffic, so they have their own pool.
        # A fresh connection per call: control calls are rare, and a kept-alive one that vLLM's
        # uvicorn closes after 5 s idle can fail the next call (seen on a wake after 5 s asleep).
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8, force_close=True))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, path: str, timeout: float,
                    payload: object = None) -> bytes:
        assert self._session is not None, "EngineClient.start() was not called"
        call = f"{method} {path}"
        limits = aiohttp.ClientTimeout(total=timeout, sock_connect=self._connect_timeout)
        guarded = path.startswith(_GUARDED_PREFIXES)
        headers = {"Authorization": f"Bearer {self._api_key}"} if guarded and self._api_key else None
        try:
            async with self._session.request(method, self.base_url + path, json=payload,
                                             headers=headers, timeout=limits) as response:
                body = await response.read()
        except aiohttp.ConnectionTimeoutError as error:
            raise EngineUnreachable(f"{call}: {type(error).__name__}: {error}".rstrip(": ")) from None
        except TimeoutError:
            raise EngineTimeout(f"{call}: no answer within {timeout:g}s") from None
        except aiohttp.ClientConnectionError as error:
            raise EngineUnreachable(f"{call}: {type(error).__name__}: {error}".rstrip(": ")) from None
        if guarded and response.status in (401, 403):
            raise EngineAuthError(call, response.status, key_sent=headers is not None)
        if response.status == 404:
            raise SleepUnsupported(call, 404, body.decode(errors="replace"))
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

    async def health(self, timeout: float = 5.0) -> None:
        """``GET /health``: raises unless the engine's server is up (200)."""
        await self._call("GET", "/health", timeout)

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

    async def wake(self, level: int, timeout: float,
                   on_step: Callable[[str, float], None] | None = None) -> None:
        """The whole wake sequence within ``timeout`` seconds; ``on_step(name, seconds)`` after
        each step that succeeded."""
        deadline = time.monotonic() + timeout
        for name, method, path, payload in WAKE_STEPS[level]:
            started = time.monotonic()
            remaining = deadline - started
            if remaining <= 0:
                raise EngineTimeout(f"level-{level} wake: {timeout:g}s passed before {name}")
            try:
                await self._call(method, path, remaining, payload)
            except EngineTimeout:
                raise EngineTimeout(f"level-{level} wake: {name} was still running at the "
                                    f"sequence's deadline of {timeout:g}s") from None
            if on_step is not None:
                on_step(name, time.monotonic() - started)

    async def check_inference(self, timeout: float) -> None:
        """A one-token completion: proof that an engine reporting awake really serves."""
        answer = await self._complete(timeout, {"prompt": "ping", "max_tokens": 1})
        try:
            answer["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise EngineNonsense(f"a one-token completion answered {str(answer)[:200]}") from None

    async def fingerprint(self, timeout: float) -> Fingerprint:
        """A fixed greedy completion, as token ids (vLLM's ``return_tokens_as_token_ids`` puts
        them in logprobs.tokens as "token_id:N"); the text when the engine gives no ids."""
        answer = await self._complete(timeout, {
            "prompt": FINGERPRINT_PROMPT, "max_tokens": FINGERPRINT_TOKENS, "temperature": 0,
            "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True})
        try:
            choice = answer["choices"][0]
            text = choice["text"]
            tokens = (choice.get("logprobs") or {}).get("tokens") or []
        except (KeyError, IndexError, TypeError, AttributeError):
            text, tokens = None, []
        if not isinstance(text, str):
            raise EngineNonsense(f"the fingerprint completion answered {str(answer)[:200]}")
        ids = [_TOKEN_ID_RE.match(t) if isinstance(t, str) else None for t in tokens]
        if tokens and all(ids):
            return Fingerprint((int(m.group(1)) for m in ids), "token_ids", text)
        return Fingerprint(map(ord, text), "text", text)

    async def models(self, timeout: float = 5.0) -> list[str]:
        """The model names the engine serves (its /v1/models: answered asleep too, never wakes)."""
        body = await self._call("GET", "/v1/models", timeout)
        try:
            return [str(entry["id"]) for entry in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError):
            raise EngineNonsense(f"GET /v1/models answered {body[:200]!r}, expected a model list") from None

    async def _complete(self, timeout: float, request: dict) -> dict:
        """One completion of the served model (asked once, and again after a refusal)."""
        if self._model is None:
            body = await self._call("GET", "/v1/models", timeout)
            try:
                self._model = json.loads(body)["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise EngineNonsense(f"GET /v1/models answered {body[:200]!r}, expected a model list") from None
        try:
            answer = await self._call("POST", "/v1/completions", timeout,
                                      {"model": self._model, **request})
        except EngineRefused:
            self._model = None   # a restarted engine may serve another name: ask again next time
            raise
        try:
            parsed = json.loads(answer)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise EngineNonsense(f"a completion answered {answer[:200]!r}")
        return parsed
