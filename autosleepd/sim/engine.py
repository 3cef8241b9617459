"""A vLLM stand-in that follows the sleep contract (``shared/vllm-sleep-contract.md``).

It answers the control endpoints with their query-string parameters, OpenAI completions and chat
completions (plain and streamed at a set token rate), and the passive endpoints. It behaves as
vLLM does when misused (a request to a sleeping engine crashes it or hangs; a plain wake after a
level-2 sleep answers garbage) and counts every such contract violation, so tests can assert that
autosleepd committed none.

Its answers are deterministic: ``expected_text(prompt, max_tokens)`` is what a healthy engine
says, so a test can tell a right answer from garbage or from someone else's answer.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import time
import zlib
from dataclasses import dataclass, field

from aiohttp import web

CONTROL_ENDPOINTS = (
    "/reset_mm_cache", "/reset_encoder_cache", "/pause", "/resume", "/is_paused",
    "/abort_requests", "/init_weight_transfer_engine", "/start_weight_update",
    "/start_draft_weight_update", "/update_weights", "/finish_weight_update",
    "/update_weight_version", "/weight_info", "/get_world_size", "/server_info",
    "/start_profile", "/stop_profile", "/scale_elastic_ep", "/is_scaling_elastic_ep",
)
VERSION = "0.26.0+autosleepd.sim"


def expected_text(prompt: str, max_tokens: int) -> str:
    """What a healthy engine answers: the prompt's words, cycled to ``max_tokens`` tokens."""
    words = prompt.split() or ["empty"]
    return "".join(" " + words[i % len(words)] for i in range(max_tokens))


@dataclass
class SimSettings:
    model: str = "sim-model"
    load_seconds: float = 0.0       # before the port accepts connections
    sleep_seconds: float = 0.0      # a /sleep call
    wake_seconds: float = 0.0       # a /wake_up call (each tag call takes it in full)
    reload_seconds: float = 0.0     # collective_rpc reload_weights
    token_seconds: float = 0.0      # between two generated tokens
    asleep_behaviour: str = "hang"  # what a request to a sleeping engine gets: "hang" or "crash"
    dev_mode: bool = True           # VLLM_SERVER_DEV_MODE=1: the control endpoints exist
    sleep_mode: bool = True         # --enable-sleep-mode
    dummy_weights: bool = False     # --load-format dummy: reload_weights fails
    sleep_state_metric: bool = True  # vllm:engine_sleep_state in /metrics (vLLM >= Nov 2025)
    # Memory model, used when the engine is given a SimGpu: what it holds on the GPU awake
    # (weights + KV cache) and asleep, and the weights it backs up in host RAM at level 1.
    awake_bytes: int = 60 * 2**30
    asleep_bytes: int = 2 * 2**30
    weights_bytes: int = 16 * 2**30
    # Engine truth (issue 11): vLLM's --api-key, and residual-memory drift (vLLM #36651): what
    # stays on the GPU asleep grows by this much at every sleep, until the process restarts.
    api_key: str | None = None
    residue_step_bytes: int = 0
    # Power on a SimGpu, above the bare GPU's draw: what vLLM 0.26 drew on an H200 (43.7 W with
    # its CUDA context, awake idle or asleep at either level), and while generating.
    awake_idle_watts: float = 43.7
    asleep_watts: dict = field(default_factory=lambda: {1: 43.7, 2: 43.7})
    busy_watts: float = 300.0


@dataclass
class Fault:
    status: int = 500
    body: str = '{"error": {"message": "injected failure", "type": "InternalServerError", "code": 500}}'
    hang: bool = False              # never answer (until the engine is killed)


@dataclass
class SimStats:
    violations: collections.Counter = field(default_factory=collections.Counter)
    calls: collections.Counter = field(default_factory=collections.Counter)
    served: int = 0                 # work requests answered correctly
    garbage: int = 0                # work requests answered with garbage
    aborted_by_client: int = 0      # work requests whose client went away mid-way
    aborted_by_sleep: int = 0       # requests aborted by /sleep mode=abort
    log: list = field(default_factory=list)   # (monotonic time, method, path, asleep)
    last_body: bytes | None = None  # the last work request's body, as received

    def as_dict(self) -> dict:
        return {"violations": dict(self.violations), "violation_total": sum(self.violations.values()),
                "calls": dict(self.calls), "served": self.served, "garbage": self.garbage,
                "aborted_by_client": self.aborted_by_client, "aborted_by_sleep": self.aborted_by_sleep}


class SimulatedEngine:
    """One simulated vLLM server. ``start()`` listens (after ``load_seconds``); ``kill()`` dies."""

    _next_pid = 4_000_000   # fake pids, far above real ones

    def __init__(self, settings: SimSettings | None = None, host: str = "127.0.0.1", port: int = 0,
                 gpu=None):
        self.settings = settings or SimSettings()
        self.gpu = gpu                  # a SimGpu shared with other engines, or None
        self.pid = SimulatedEngine._next_pid
        SimulatedEngine._next_pid += 1
        self.host_bytes = 0             # host RAM holding the level-1 weight backup
        self.listening = False
        self.host = host
        self._sock = self._bind(port)
        self.port = self._sock.getsockname()[1]
        self.stats = SimStats()
        self.faults: dict[str, collections.deque[Fault]] = collections.defaultdict(collections.deque)
        self.corrupt_next_wake = False  # the next full wake answers wrong (vLLM #53888, #29341)
        self._runner: web.AppRunner | None = None
        self._reset_engine()

    def _bind(self, port: int) -> socket.socket:
        # Bound now so the port is known, but listening only once "loaded": until then a
        # connection is refused, as with a vLLM that is still starting.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        return sock

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ----- engine state ----------------------------------------------------------------------

    def _reset_engine(self) -> None:
        self.asleep_tags: set[str] = set()
        self.level: int | None = None
        self.weights_valid = True
        self.weights_reloaded = True    # after a level-2 sleep: reload_weights was called
        self.dead = False
        self.paused = False             # /sleep received: the scheduler takes no new work
        self._awake = asyncio.Event()
        self._awake.set()
        self.zombie = False             # a wake ran out of GPU memory: only a restart helps
        self._in_flight: set[asyncio.Task] = set()   # every work request, waiting or running
        self._running: set[asyncio.Task] = set()     # those past the scheduler (engine awake)
        self._aborted: set[asyncio.Task] = set()
        self._hung: list[asyncio.Future] = []
        self.residue_bytes = 0          # leaked by the sleeps since this process started

    @property
    def sleeping(self) -> bool:
        return bool(self.asleep_tags)

    def _power_changes(self) -> None:
        if self.gpu is not None:
            self.gpu.count_energy()   # the energy counter moves on at the new draw

    @property
    def watts(self) -> float:
        """This process's draw above the bare GPU's."""
        if self.sleeping:
            return self.settings.asleep_watts[self.level]
        return self.settings.busy_watts if self._running else self.settings.awake_idle_watts

    def fail_next(self, path: str, times: int = 1, **fault) -> None:
        """The next ``times`` calls of ``path`` fail as ``Fault(**fault)`` says."""
        for _ in range(times):
            self.faults[path].append(Fault(**fault))

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.settings.load_seconds:
            await asyncio.sleep(self.settings.load_seconds)   # the model loads; port refuses
        if self.gpu is not None:
            if self.gpu.free < self.settings.awake_bytes:
                raise RuntimeError(f"CUDA out of memory while loading: {self.gpu.free} bytes free, "
                                   f"{self.settings.awake_bytes} needed")
            self.gpu.take(self.pid, self.settings.awake_bytes)
            self.gpu.attach(self.pid, lambda: self.watts)
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        # vLLM's uvicorn listens with a backlog of 2048; aiohttp's default (128) would drop the
        # connects of a large burst released at once.
        await web.SockSite(self._runner, self._sock, backlog=2048).start()
        self.listening = True

    async def kill(self) -> None:
        """Die like a killed process: connections cut, port closed, state forgotten."""
        for task in list(self._in_flight):
            task.cancel()
        for future in self._hung:
            future.cancel()
        if self._runner is not None:
            for conn in list(self._runner.server.connections if self._runner.server else []):
                if conn.transport is not None:
                    conn.transport.abort()
            await self._runner.cleanup()   # closes the listening socket
            self._runner = None
            self._sock = self._bind(self.port)
        self.listening = False
        if self.gpu is not None:
            self.gpu.release_all(self.pid)   # a dead process gives all its memory back
        self.host_bytes = 0
        self._reset_engine()

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    async def close(self) -> None:
        await self.kill()
        self._sock.close()

    # ----- dispatch --------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.stats.calls[path] += 1
        self.stats.log.append((time.monotonic(), request.method, path, self.sleeping or self.paused))
        if path.startswith("/sim/"):
            return await self._sim_endpoint(request)
        if not self._authorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        if self.faults.get(path):
            fault = self.faults[path].popleft()
            if fault.hang:
                future = asyncio.get_running_loop().create_future()
                self._hung.append(future)
                await future
            return web.Response(status=fault.status, text=fault.body, content_type="application/json")
        if self.dead:
            if path in ("/health", "/ping"):
                return web.Response(status=503)
            return _error(500, "EngineDeadError: the engine core died", "InternalServerError")
        handler = self._routes().get((request.method, path))
        if handler is None:
            if path in CONTROL_ENDPOINTS and self.settings.dev_mode:
                return web.json_response({})
            return web.json_response({"detail": "Not Found"}, status=404)
        return await handler(request)

    def _routes(self) -> dict:
        routes = {
            ("GET", "/health"): self._health, ("GET", "/ping"): self._health,
            ("POST", "/ping"): self._health,
            ("GET", "/version"): self._version, ("GET", "/v1/models"): self._models,
            ("GET", "/metrics"): self._metrics, ("GET", "/load"): self._load,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._completions,
        }
        if self.settings.dev_mode:
            routes.update({
                ("POST", "/sleep"): self._sleep, ("POST", "/wake_up"): self._wake_up,
                ("GET", "/is_sleeping"): self._is_sleeping,
                ("POST", "/collective_rpc"): self._collective_rpc,
                ("POST", "/reset_prefix_cache"): self._reset_prefix_cache,
            })
        return routes

    # ----- passive endpoints -----------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.settings.model, "object": "model", "owned_by": "vllm", "root": self.settings.model}]})

    async def _load(self, request: web.Request) -> web.Response:
        return web.json_response({"server_load": len(self._in_flight)})

    async def _metrics(self, request: web.Request) -> web.Response:
        lines = ["# HELP vllm:num_requests_running Number of requests in model execution batches.",
                 "# TYPE vllm:num_requests_running gauge",
                 f'vllm:num_requests_running{{engine="0",model_name="{self.settings.model}"}} '
                 f"{float(len(self._in_flight))}"]
        if self.settings.sleep_state_metric:
            current = {None: "awake", 1: "weights_offloaded", 2: "discard_all"}[self.level]
            lines += ["# HELP vllm:engine_sleep_state Engine sleep state.",
                      "# TYPE vllm:engine_sleep_state gauge"]
            for state in ("awake", "weights_offloaded", "discard_all"):
                lines.append(f'vllm:engine_sleep_state{{engine="0",model_name="{self.settings.model}",'
                             f'sleep_state="{state}"}} {1.0 if state == current else 0.0}')
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    # ----- control endpoints -----------------------------------------------------------------

    async def _is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.sleeping})

    async def _sleep(self, request: web.Request) -> web.Response:
        if request.can_read_body and await request.read():
            self.stats.violations["sleep_params_in_body"] += 1   # vLLM ignores a body
        level = int(request.query.get("level", "1"))
        mode = request.query.get("mode", "abort")
        if level not in (0, 1, 2) or mode not in ("abort", "wait", "keep"):
            return _error(400, f"invalid level {level} or mode {mode}", "BadRequestError")
        if not self.settings.sleep_mode:
            return _error(500, "Sleep mode is not enabled in the model config", "InternalServerError")
        if self.sleeping:
            self.stats.violations["sleep_while_asleep"] += 1
            if mode == "abort":
                self._abort_all()
            return web.Response(status=200)
        self.paused = True
        if mode == "abort":
            self._abort_all()
        self._awake.clear()   # the scheduler is paused: new work waits
        if mode == "wait":
            while self._running:
                await asyncio.wait(set(self._running))
        await asyncio.sleep(self.settings.sleep_seconds)
        if level == 0:
            return web.Response(status=200)   # paused only; /wake_up resumes
        self.level = level
        self.asleep_tags = {"weights", "kv_cache"}
        self._power_changes()
        if self.gpu is not None:
            self.gpu.set_holding(self.pid, self._leak_and_hold())
        if level == 1:
            self.host_bytes = self.settings.weights_bytes   # pinned CPU backup of the weights
        if level == 2:
            self.weights_valid = False
            self.weights_reloaded = False
        return web.Response(status=200)

    async def _wake_up(self, request: web.Request) -> web.Response:
        tags = set(request.query.getall("tags", [])) or {"weights", "kv_cache", "scheduling"}
        if not tags <= {"weights", "kv_cache", "scheduling"}:
            return _error(400, f"unknown tags {sorted(tags)}", "BadRequestError")
        if self.zombie:
            return _error(500, "CUDA Error: invalid argument", "InternalServerError")
        if self.sleeping and self.gpu is not None:
            held = self.gpu.holdings.get(self.pid, 0)
            need = self._awake_holding(self.asleep_tags - tags) - held
            if need > 0 and self.gpu.take(self.pid, need) < need:
                # As measured: the engine keeps what it mapped and can never wake again.
                self.zombie = True
                self.stats.violations["wake_without_memory"] += 1
                return _error(500, "CUDA Error: out of memory", "InternalServerError")
        if self.sleeping:
            if self.level == 2 and "kv_cache" in tags:
                if "weights" in self.asleep_tags and "weights" not in tags:
                    self.stats.violations["kv_cache_before_weights"] += 1
                if not self.weights_reloaded:
                    self.stats.violations["level2_wake_without_reload"] += 1
            await asyncio.sleep(self.settings.wake_seconds)
            self.asleep_tags -= tags
            self._power_changes()
            if not self.asleep_tags:
                self._corrupt_if_asked()
        if not self.asleep_tags:
            self.level = None
            self.paused = False
            self.host_bytes = 0
            self._awake.set()
        return web.Response(status=200)

    async def _collective_rpc(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            method = body["method"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "invalid JSON or missing method", "BadRequestError")
        if method != "reload_weights":
            return web.json_response({"results": [None]})
        if self.settings.dummy_weights:
            return _error(500, "Model reloading with `dummy` format", "InternalServerError")
        if "weights" in self.asleep_tags:
            return _error(500, "cannot reload weights into sleeping memory", "InternalServerError")
        await asyncio.sleep(self.settings.reload_seconds)
        self.weights_valid = True
        self.weights_reloaded = True
        return web.json_response({"results": [None]})

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        return web.json_response({"success": True})

    def _awake_holding(self, still_asleep: set[str]) -> int:
        """GPU bytes held once only ``still_asleep`` tags sleep: weights first, then KV cache."""
        s = self.settings
        weights = min(s.weights_bytes, s.awake_bytes - s.asleep_bytes)
        holding = s.awake_bytes + self.residue_bytes
        if "kv_cache" in still_asleep:
            holding -= s.awake_bytes - s.asleep_bytes - weights
        if "weights" in still_asleep:
            holding -= weights
        return holding

    # ----- engine truth: an API key, a wrong wake, a growing residue ---------------------------

    def _authorized(self, request: web.Request) -> bool:
        """As vLLM's --api-key: only /v1 (and /v2, /inference, /cohere) need the bearer key."""
        if self.settings.api_key is None:
            return True
        if not request.path.startswith(("/v1", "/v2", "/inference", "/cohere")):
            return True
        return request.headers.get("Authorization") == f"Bearer {self.settings.api_key}"

    def _corrupt_if_asked(self) -> None:
        """After a full wake: answer wrong from now on if asked to (``/health`` stays 200)."""
        if self.corrupt_next_wake:
            self.corrupt_next_wake = False
            self.weights_valid = False

    def _leak_and_hold(self) -> int:
        """GPU bytes held asleep: the contracted rest, plus what every sleep so far leaked."""
        self.residue_bytes += self.settings.residue_step_bytes
        return self.settings.asleep_bytes + self.residue_bytes

    def _abort_all(self) -> None:
        for task in list(self._in_flight):
            self.stats.aborted_by_sleep += 1
            self._aborted.add(task)
            task.cancel()

    # ----- work ------------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            self.stats.last_body = await request.read()
            body = await request.json()
            prompt, max_tokens, stream = _parse_completion(request.path, body)
        except (ValueError, KeyError, TypeError) as error:
            return _error(400, f"invalid request: {error}", "BadRequestError")
        task = asyncio.current_task()
        arrived_asleep = self.sleeping or self.paused
        if arrived_asleep:
            self.stats.violations["request_while_asleep"] += 1
            if self.settings.asleep_behaviour == "crash":
                self.dead = True   # CUDA illegal memory access: the engine core is gone
                return _error(500, "CUDA error: an illegal memory access was encountered",
                              "InternalServerError")
        self._in_flight.add(task)
        try:
            response = None
            if stream:   # v0.17+: a stream gets its 200 even from a sleeping engine
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
                await response.prepare(request)
            await self._awake.wait()
            self._running.add(task)
            self._power_changes()
            if response is not None:
                return await self._stream(request, response, prompt, max_tokens)
            text = await self._generate(prompt, max_tokens)
            answer = _completion_body(request.path, self.settings.model, text, "length")
            answer["usage"] = _usage(prompt, max_tokens)   # as vLLM: some clients need it
            return web.json_response(_with_logprobs(answer, body, text))
        except asyncio.CancelledError:
            if task not in self._aborted:
                self.stats.aborted_by_client += 1
            raise
        finally:
            self._in_flight.discard(task)
            self._running.discard(task)
            self._power_changes()
            self._aborted.discard(task)

    async def _generate(self, prompt: str, max_tokens: int) -> str:
        for _ in range(max_tokens):
            if self.settings.token_seconds:
                await asyncio.sleep(self.settings.token_seconds)
        return self._answer(prompt, max_tokens)

    def _answer(self, prompt: str, max_tokens: int) -> str:
        if self.weights_valid:
            self.stats.served += 1
            return expected_text(prompt, max_tokens)
        self.stats.garbage += 1
        return " !!" * max_tokens

    async def _stream(self, request: web.Request, response: web.StreamResponse, prompt: str,
                      max_tokens: int) -> web.StreamResponse:
        text = expected_text(prompt, max_tokens) if self.weights_valid else " !!" * max_tokens
        words = text.split(" ")[1:]
        if request.path.endswith("/chat/completions"):   # vLLM's first chat delta: the role
            first = _completion_body(request.path, self.settings.model, "", None, delta=True)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            await response.write(b"data: " + json.dumps(first).encode() + b"\n\n")
        for i, word in enumerate(words):
            if self.settings.token_seconds:
                await asyncio.sleep(self.settings.token_seconds)
            chunk = _completion_body(request.path, self.settings.model, " " + word,
                                     "length" if i == len(words) - 1 else None, delta=True)
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        self._answer(prompt, max_tokens)
        await response.write_eof()
        return response

    # ----- the simulator's own endpoints (for tests that run it in another process) ----------

    async def _sim_endpoint(self, request: web.Request) -> web.Response:
        if request.path == "/sim/stats":
            return web.json_response({**self.stats.as_dict(), "sleeping": self.sleeping,
                                      "level": self.level, "dead": self.dead,
                                      "zombie": self.zombie, "residue_bytes": self.residue_bytes})
        if request.path == "/sim/echo":   # what arrived, byte for byte
            return web.Response(body=await request.read(),
                                content_type=request.content_type or "application/octet-stream")
        if request.path == "/sim/corrupt_next_wake" and request.method == "POST":
            self.corrupt_next_wake = True
            return web.json_response({"ok": True})
        if request.path == "/sim/fault" and request.method == "POST":
            spec = await request.json()
            self.fail_next(spec.pop("path"), spec.pop("times", 1), **spec)
            return web.json_response({"ok": True})
        return web.json_response({"detail": "Not Found"}, status=404)


def _parse_completion(path: str, body: dict) -> tuple[str, int, bool]:
    if path.endswith("/chat/completions"):
        messages = body["messages"]
        prompt = str(messages[-1]["content"])
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list):
            prompt = " ".join(map(str, prompt))
    max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    return str(prompt), max_tokens, bool(body.get("stream", False))


def _completion_body(path: str, model: str, text: str, finish: str | None, delta: bool = False) -> dict:
    if path.endswith("/chat/completions"):
        key, content = ("delta", {"content": text}) if delta else ("message", {"role": "assistant", "content": text})
        choice = {"index": 0, key: content, "finish_reason": finish}
        kind = "chat.completion.chunk" if delta else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        kind = "text_completion"
    return {"id": "cmpl-sim", "object": kind, "created": int(time.time()), "model": model,
            "choices": [choice]}


def _with_logprobs(answer: dict, request: dict, text: str) -> dict:
    """A completion's ``logprobs`` when asked: one token per word, with ids derived from the
    word, shown as "token_id:N" under ``return_tokens_as_token_ids`` as vLLM does."""
    choice = answer["choices"][0]
    if not request.get("logprobs") or "text" not in choice:
        return answer
    words = [" " + word for word in text.split(" ")[1:]]
    ids = [zlib.crc32(word.encode()) % 151_936 for word in words]
    tokens = ([f"token_id:{i}" for i in ids] if request.get("return_tokens_as_token_ids")
              else words)
    offsets = [sum(map(len, words[:n])) for n in range(len(words))]
    choice["logprobs"] = {"tokens": tokens, "token_logprobs": [-0.01] * len(words),
                          "top_logprobs": [{t: -0.01} for t in tokens], "text_offset": offsets}
    return answer


def _usage(prompt: str, max_tokens: int) -> dict:
    prompt_tokens = len(prompt.split())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
            "total_tokens": prompt_tokens + max_tokens}


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None,
                                        "code": status}}, status=status)
