"""Errors as clients see them: OpenAI-shaped JSON, and the one table from a refusal to HTTP."""

from __future__ import annotations

import json
import math

from aiohttp import web

# Why the control plane refused a request -> (status, error type, Retry-After seconds).
REFUSALS = {
    "queue_full": (503, "service_unavailable", 1),
    "wake_timeout": (503, "service_unavailable", 10),
    "shutting_down": (503, "service_unavailable", 5),
    "engine_unavailable": (502, "bad_gateway", 5),
    "no_gpu_memory": (503, "service_unavailable", 30),
    "engine_broken": (503, "service_unavailable", 30),
    "engine_start_failed": (503, "service_unavailable", 30),
}


def error_response(status: int, message: str, kind: str, code: str,
                   retry_after: int | None = None) -> web.Response:
    """An OpenAI-shaped error, so SDKs and gateways show the message."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(status=status, text=json.dumps(body), content_type="application/json",
                        headers=headers)


def refusal_response(reason: str, message: str, retry_after: float | None = None) -> web.Response:
    """``retry_after``: the control plane's estimate (a wake's expected remaining time), if any."""
    status, kind, default = REFUSALS[reason]
    seconds = default if retry_after is None else max(1, math.ceil(retry_after))
    return error_response(status, message, kind, reason, seconds)
