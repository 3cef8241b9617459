#!/usr/bin/env python3
"""A load of concurrent server-sent-event streams, each restarted on its own connection.

Raw asyncio protocols with the llhttp parser, so the client costs little next to what it
measures. Each connection sends a streamed completion, reads it to its end and sends the next,
until the time is up. Prints one JSON line: streams finished, events, time to the first event
(from sending the request), and how many socket reads carried several events (coalescing).

    python bench/streams.py URL --connections 256 --seconds 10 --max-tokens 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

import httptools


def request_bytes(host: str, path: str, max_tokens: int, model: str = "sim-model",
                  extra: dict | None = None) -> bytes:
    """``extra``: more fields for the body (vLLM: ignore_eos, allowed_token_ids, ...)."""
    body = json.dumps({"model": model, "prompt": "stream me", "max_tokens": max_tokens,
                       "stream": True, **(extra or {})}).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Totals:
    def __init__(self, until: float, window: tuple[float, float] | None = None):
        self.until = until
        self.window = window     # a span of wall-clock time (time.time()) whose tokens are counted
        self.window_tokens = 0
        self.streams = 0
        self.events = 0
        self.reads = 0
        self.reads_with_several = 0
        self.reads_with_several_tokens = 0   # not counting the [DONE] that follows the last token
        self.bad_status = 0
        self.ttft: list[float] = []
        self.cut = 0          # streams whose connection closed before their end


class StreamClient(asyncio.Protocol):
    """One connection: a stream, then the next, until ``totals.until``."""

    def __init__(self, request: bytes, totals: Totals, done: asyncio.Future):
        self.request = request
        self.totals = totals
        self.done = done
        self.parser = httptools.HttpResponseParser(self)
        self.sent = 0.0
        self.first = True
        self.busy = False
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        self.first = True
        self.busy = True
        self.sent = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        events = data.count(b"data: ")
        if events:
            totals = self.totals
            if self.first:
                self.first = False
                totals.ttft.append(time.perf_counter() - self.sent)
            totals.events += events
            totals.reads += 1
            totals.reads_with_several += events > 1
            tokens = events - data.count(b"data: [DONE]")
            totals.reads_with_several_tokens += tokens > 1
            if totals.window and totals.window[0] <= time.time() < totals.window[1]:
                totals.window_tokens += tokens
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.busy = False
        self.totals.streams += 1
        if self.parser.get_status_code() != 200:
            self.totals.bad_status += 1
        if time.monotonic() < self.totals.until:
            self.send()
        else:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.totals.cut += self.busy
        if not self.done.done():
            self.done.set_result(None)


async def run(url: str, connections: int, seconds: float, max_tokens: int,
              path: str = "/v1/completions", model: str = "sim-model") -> dict:
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    request = request_bytes(parts.netloc, path, max_tokens, model)
    totals = Totals(time.monotonic() + seconds)
    finished = []
    started = time.perf_counter()
    for _ in range(connections):
        done = loop.create_future()
        await loop.create_connection(lambda: StreamClient(request, totals, done),
                                     parts.hostname, parts.port)
        finished.append(done)
    await asyncio.wait_for(asyncio.gather(*finished), seconds + 60)
    elapsed = time.perf_counter() - started
    ttft = sorted(totals.ttft)
    return {"connections": connections, "seconds": round(elapsed, 3), "streams": totals.streams,
            "events": totals.events, "events_per_s": round(totals.events / elapsed),
            "reads": totals.reads, "reads_with_several_events": totals.reads_with_several,
            "coalesced_share": round(totals.reads_with_several / max(1, totals.reads), 4),
            "token_coalesced_share": round(totals.reads_with_several_tokens / max(1, totals.reads), 4),
            "bad_status": totals.bad_status, "cut_streams": totals.cut,
            "ttft_p50_ms": round(1000 * ttft[len(ttft) // 2], 3) if ttft else None,
            "ttft_p90_ms": round(1000 * ttft[int(len(ttft) * 0.9)], 3) if ttft else None}


async def run_steady(url: str, connections: int, start_at: float, stagger: float,
                     window: tuple[float, float], max_tokens: int, path: str = "/v1/completions",
                     model: str = "sim-model", extra: dict | None = None) -> dict:
    """Streams kept running through a window of wall-clock time, for a steady token rate.

    Connections open from ``start_at`` on, spread over ``stagger`` seconds so that streams of one
    length do not start and end in waves; the tokens that arrive within ``window`` are counted;
    at its end every connection is closed, mid-stream or not (the engine aborts those), so no
    tail of lone streams finishing weighs on the figure. Times are ``time.time()``, so several
    load processes share one window.
    """
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    request = request_bytes(parts.netloc, path, max_tokens, model, extra)
    until = time.monotonic() + (window[1] - time.time())
    totals = Totals(until, window)
    clients: list[StreamClient] = []
    await asyncio.sleep(max(0.0, start_at - time.time()))
    for i in range(connections):
        await asyncio.sleep(max(0.0, start_at + stagger * i / connections - time.time()))
        done = loop.create_future()
        _, client = await loop.create_connection(lambda: StreamClient(request, totals, done),
                                                 parts.hostname, parts.port)
        clients.append(client)
    await asyncio.sleep(max(0.0, window[1] - time.time()))
    for client in clients:
        client.busy = False      # ended by the load itself: not a cut stream
        client.transport.close()
    ttft = sorted(totals.ttft)
    return {"connections": connections, "window_s": round(window[1] - window[0], 3),
            "window_tokens": totals.window_tokens, "streams": totals.streams,
            "reads": totals.reads, "reads_with_several_events": totals.reads_with_several,
            "bad_status": totals.bad_status, "cut_streams": totals.cut, "ttft_s": ttft}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--path", default="/v1/completions")
    parser.add_argument("--model", default="sim-model")
    args = parser.parse_args()
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run(run(args.url, args.connections, args.seconds, args.max_tokens,
                                args.path, args.model))
    print("STREAMS " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
