"""Which class a request path belongs to: blocked (a vLLM control path), passive, or work.

Paths are classified after normalising their spelling, so ``//sleep`` or ``/v1/../sleep`` cannot
slip past the block list.
"""

from __future__ import annotations

# vLLM's development-mode paths (see the sleep contract): a client must never reach them.
CONTROL_PATHS = frozenset({
    "/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache",
    "/reset_mm_cache", "/reset_encoder_cache", "/pause", "/resume", "/is_paused",
    "/abort_requests", "/init_weight_transfer_engine", "/start_weight_update",
    "/start_draft_weight_update", "/update_weights", "/finish_weight_update",
    "/update_weight_version", "/weight_info", "/get_world_size", "/server_info",
    "/start_profile", "/stop_profile", "/scale_elastic_ep", "/is_scaling_elastic_ep",
})

# Paths that never touch the engine core: served in any state, never activity.
PASSIVE_PATHS = frozenset({
    "/health", "/ping", "/version", "/metrics", "/load", "/v1/models",
    "/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect",
})


# Paths that run the model: never passive, whatever AUTOSLEEPD_PASSIVE_PATHS says.
INFERENCE_PATHS = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses",
    "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/messages", "/v1/score",
    "/v1/rerank", "/v2/rerank", "/rerank", "/score", "/pooling", "/classify", "/invocations",
    "/generate", "/inference/v1/generate",
})

# Methods that carry no work to the engine: vLLM runs no inference on them. Without a body,
# they are passive on any path, so a load balancer probing / can neither wake the engine nor
# keep it awake; while it sleeps, vLLM answers them (404, 405 or the page) without the engine.
PASSIVE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def normalize_path(path: str) -> str:
    """The form a path is classified in: no repeated or trailing slashes, no dot segments.

    vLLM's router would match ``//sleep`` or ``/v1/../sleep`` after its own normalisation, so
    the proxy classifies the normalised path to keep such spellings from slipping through.
    """
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


class Classifier:
    """``classify(path, method, has_body)`` -> "blocked", "passive" or "work"."""

    CACHE_SIZE = 4096   # the paths clients use are few; scanners may send many more

    def __init__(self, blocked: frozenset[str], passive: frozenset[str]):
        self._blocked = blocked
        self._passive = passive
        self._kinds: dict[str, str] = {}

    def __call__(self, path: str, method: str, has_body: bool) -> str:
        kind = self._path_kind(path)
        if kind == "work" and method in PASSIVE_METHODS and not has_body:
            return "passive"
        return kind

    def _path_kind(self, path: str) -> str:
        """By path alone, cached per raw path."""
        kind = self._kinds.get(path)
        if kind is None:
            normal = normalize_path(path)
            if normal in self._blocked:
                kind = "blocked"
            elif normal in self._passive:
                kind = "passive"
            else:
                kind = "work"
            if len(self._kinds) < self.CACHE_SIZE:
                self._kinds[path] = kind
        return kind
