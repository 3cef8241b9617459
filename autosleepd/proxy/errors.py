"""Errors as clients see them: OpenAI-shaped JSON, and the one table from a refusal to HTTP."""

from __future__ import annotations

import json
import math
from http import HTTPStatus

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


def error_body(message: str, kind: str, code: str) -> str:
    """An OpenAI-shaped error, so SDKs and gateways show the message."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def error_response(status: int, message: str, kind: str, code: str,
                   retry_after: int | None = None) -> web.Response:
    """The error as an aiohttp response (autosleepd's own endpoints)."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(status=status, text=error_body(message, kind, code),
                        content_type="application/json", headers=headers)


def error_bytes(status: int, message: str, kind: str, code: str,
                retry_after: int | None = None, close: bool = False) -> bytes:
    """The error as a whole HTTP/1.1 answer (the relay writes it to the socket itself)."""
    body = error_body(message, kind, code).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json; "
            f"charset=utf-8\r\nContent-Length: {len(body)}\r\n")
    if retry_after is not None:
        head += f"Retry-After: {retry_after}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


def refusal(reason: str, retry_after: float | None = None) -> tuple[int, str, int]:
    """``retry_after``: the control plane's estimate (a wake's expected remaining time), if any.
    Returns (status, error type, Retry-After seconds)."""
    status, kind, default = REFUSALS[reason]
    return status, kind, default if retry_after is None else max(1, math.ceil(retry_after))
