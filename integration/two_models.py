"""One autosleepd on one port in front of two engines (docker-compose.two-models.yml), as a user
sees it (standard library only):

    python3 integration/two_models.py URL --restart-small CMD --stop-small CMD --start-small CMD
        --stop CMD --exit-code CMD

1. each model is answered by its own engine through the one port; /v1/models lists both;
2. idle puts each engine to sleep; a request for "large" wakes "large" only;
3. an unknown model gets 404 model_not_found naming the models there are;
4. a request for "small" sent while its engine restarts (--restart-small) is held and served by
   the new engine, while "large" keeps answering;
5. a request for "small" held while its engine is stopped (--stop-small) is served once it is
   started again (--start-small);
6. with "small" stopped again and requests for it held, streams to "large" in flight when
   autosleepd is stopped (--stop) finish whole, the held requests get 503 shutting_down at once,
   and autosleepd exits 0 (--exit-code prints its exit status) within 8 s.

Each step prints one line; the first failure exits 1.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from scenario import call, complete, drained_on_stop, fail, held_across, ok, run, served, status, until

MODELS = ("large", "small")


def engines(url: str) -> dict[str, dict]:
    """The host view, by engine name."""
    try:
        return {engine["name"]: engine for engine in call(url, "/autosleepd/host", timeout=5)[1]["engines"]}
    except (OSError, ValueError, KeyError):
        return {}


def states(url: str) -> dict[str, str]:
    return {name: engine["state"] for name, engine in engines(url).items()}


def wakes(url: str) -> dict[str, int]:
    return {model: call(url, f"/autosleepd/status?model={model}", timeout=5)[1]["wakes"] for model in MODELS}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--restart-small", required=True, help="a planned restart of the 'small' engine")
    parser.add_argument("--stop-small", required=True, help="stops the 'small' engine")
    parser.add_argument("--start-small", required=True, help="starts the 'small' engine again")
    parser.add_argument("--stop", required=True, help="stops autosleepd")
    parser.add_argument("--exit-code", required=True, help="prints the stopped autosleepd's exit status")
    parser.add_argument("--idle", type=float, default=3.0, help="autosleepd's idle window")
    args = parser.parse_args()
    url = args.url.rstrip("/")

    until("autosleepd has found both engines",
          lambda: all(states(url).get(m) in ("awake", "asleep") for m in MODELS), 120)
    ok(f"one port, two engines: {states(url)}")
    listed = sorted(model["id"] for model in call(url, "/v1/models")[1].get("data", []))
    if listed != sorted(MODELS):
        fail(f"GET /v1/models lists {listed}, not {sorted(MODELS)}")
    for model in MODELS:
        answer = complete(url, model)
        if not served(answer, model):
            fail(f"a completion for {model!r} got {answer[0]} {json.dumps(answer[1])[:300]}")
    ok("GET /v1/models lists both; a completion for each model is answered by its own engine")

    slept = until("both engines asleep after the idle window",
                  lambda: all(s == "asleep" for s in states(url).values()), args.idle + 60)
    ok(f"both engines fell asleep after the idle window ({slept:.1f}s after the last request)")
    before, started = wakes(url), time.monotonic()
    answer = complete(url, "large")
    took = time.monotonic() - started
    after, now = wakes(url), states(url)
    if not served(answer, "large"):
        fail(f"the request for 'large' got {answer[0]} {json.dumps(answer[1])[:300]}")
    if (after["large"], after["small"]) != (before["large"] + 1, before["small"]) or now != {
            "large": "awake", "small": "asleep"}:
        fail(f"a request for 'large' should wake it alone: wakes {before} -> {after}, states {now}")
    ok(f"a request for 'large' woke 'large' alone: 200 in {took:.2f}s; 'small' still asleep")

    code, body = call(url, "/v1/completions", {"model": "llama", "prompt": "x", "max_tokens": 1})
    error = body.get("error") or {}
    if code != 404 or error.get("code") != "model_not_found" or not all(m in error.get("message", "") for m in MODELS):
        fail(f"an unknown model got {code} {json.dumps(body)[:300]}, not 404 model_not_found listing both")
    ok(f"an unknown model gets 404 model_not_found: {error['message']}")

    def large_answers() -> None:
        started = time.monotonic()
        if not served(complete(url, "large"), "large"):
            fail("'large' did not answer while 'small' restarted")
        ok(f"while the request for 'small' was held, 'large' answered in {time.monotonic() - started:.2f}s")

    held_across(url, "restart of vllm-small", args.restart_small, model="small", host=True,
                meanwhile=large_answers)
    held_while_stopped(url, args.stop_small, args.start_small)
    drained_on_stop(url, ["large"], args.stop, args.exit_code, host=True, streams=4, bound=8,
                    held="small", down=args.stop_small)


def held_while_stopped(url: str, stop: str, start: str) -> None:
    """A request for 'small' arrives while its engine is stopped: it is held, not refused, and
    answered by the engine once it is started again."""
    run(stop)
    result: list = []
    sender = threading.Thread(target=lambda: result.append(complete(url, "small")))
    sent = time.monotonic()
    sender.start()
    until("the request for 'small' is held while its engine is stopped",
          lambda: status(url, "small").get("queued", 0) >= 1 or not sender.is_alive(), 30)
    if not sender.is_alive():
        fail(f"a request for 'small' while its engine was stopped was not held: {result}")
    held = time.monotonic() - sent
    started = time.monotonic()
    run(start)
    sender.join(120)
    answer = result[0] if result else (None, {})
    if not served(answer, "small"):
        fail(f"the request held while 'small' was stopped got {answer[0]} {json.dumps(answer[1])[:300]}")
    ok(f"a request for 'small' sent while its engine was stopped was held (seen queued after {held:.1f}s; "
       f"then started), then served 200 by 'small' {time.monotonic() - started:.1f}s after the start began")


if __name__ == "__main__":
    main()
