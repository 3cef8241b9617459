"""What a user of a deployment would do, against a running autosleepd (standard library only).

    python3 integration/scenario.py URL --token-file F --restart CMD --crash CMD --sidecar CMD

1. a completion is served;
2. the engine falls asleep after the idle window, and the next completion wakes it;
3. for each of --restart (a planned restart of vLLM) and --crash (vLLM killed; its supervisor
   brings it back): a completion sent while vLLM is down is held, then served by the new engine;
4. the sidecar is the same process all along (--sidecar prints its identity).

Each step prints one line; the first failure exits 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

PROMPT = "held across a restart"
EXPECTED = " held across a restart"   # the simulator echoes the prompt's words, 4 tokens


def call(url: str, path: str, body: dict | None = None, token: str | None = None,
         timeout: float = 180, method: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"}, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def status(url: str) -> dict:
    return call(url, "/autosleepd/status", timeout=5)[1]


def until(what: str, check, deadline: float) -> float:
    """Poll ``check`` every 50 ms until it is true; return the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > deadline:
            fail(f"{what}: not within {deadline:g}s (status: {json.dumps(status(URL))})")
        time.sleep(0.05)
    return time.monotonic() - started


def fail(message: str) -> None:
    print(f"FAIL {message}", flush=True)
    sys.exit(1)


def ok(message: str) -> None:
    print(f"ok   {message}", flush=True)


def complete(url: str) -> tuple[int, dict]:
    return call(url, "/v1/completions", {"model": "model", "prompt": PROMPT, "max_tokens": 4})


def run(command: str) -> str:
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        fail(f"{command!r} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


def held_across(url: str, name: str, command: str) -> None:
    """Run ``command`` (it takes vLLM down), send a completion, and see it held, then served."""
    started = time.monotonic()
    run(command)
    result: list = []
    sender = threading.Thread(target=lambda: result.append(complete(url)))
    sender.start()
    held = until(f"{name}: the request is held",
                 lambda: status(url).get("queued", 0) >= 1 or not sender.is_alive(), 30)
    seen_held = sender.is_alive()
    sender.join(200)
    code, body = result[0] if result else (None, {})
    text = (body.get("choices") or [{}])[0].get("text")
    if code != 200 or text != EXPECTED:
        fail(f"{name}: the held request got {code} {json.dumps(body)[:300]}")
    if not seen_held:
        fail(f"{name}: the request was answered before it could be seen held (vLLM was not down?)")
    ok(f"{name}: a request sent while vLLM was down was held (seen queued after {held:.2f}s), "
       f"then served 200 with the right text {time.monotonic() - started:.1f}s after the command")


def main() -> None:
    global URL
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--token-file", required=True, help="holds the admin token")
    parser.add_argument("--restart", required=True, help="a planned restart of vLLM")
    parser.add_argument("--crash", help="kills vLLM; its supervisor must bring it back")
    parser.add_argument("--sidecar", required=True, help="prints the sidecar's process identity")
    parser.add_argument("--idle", type=float, default=3.0, help="the sidecar's idle window")
    args = parser.parse_args()
    URL = url = args.url.rstrip("/")
    token = open(args.token_file).read().strip()

    until("the sidecar has found the engine", lambda: _state(url) in ("awake", "asleep"), 120)
    sidecar = run(args.sidecar)
    ok(f"sidecar up, engine {_state(url)} (sidecar: {sidecar})")
    code, body = complete(url)
    if code != 200 or body["choices"][0]["text"] != EXPECTED:
        fail(f"first completion: {code} {body}")
    ok("a completion is served")
    slept = until("idle sleep", lambda: _state(url) == "asleep", args.idle + 60)
    ok(f"the engine fell asleep after the idle window ({slept:.1f}s after the request)")
    started, wakes = time.monotonic(), status(url)["wakes"]
    code, body = complete(url)
    if code != 200 or status(url)["wakes"] != wakes + 1:
        fail(f"the wake: {code} {body} {status(url)}")
    ok(f"a request woke it: 200 in {time.monotonic() - started:.2f}s, one wake")
    code, _ = call(url, "/autosleepd/sleep", token=token + "-wrong", method="POST")
    if code != 401:
        fail(f"a wrong admin token got {code}, not 401")
    code, _ = call(url, "/autosleepd/sleep", token=token, method="POST")
    if code != 200 or _state(url) != "asleep":
        fail(f"a manual sleep with the admin token got {code}")
    ok("the admin token from the env file works (and a wrong one gets 401)")
    held_across(url, "planned restart", args.restart)
    if args.crash:
        held_across(url, "crash", args.crash)
    if run(args.sidecar) != sidecar:
        fail(f"the sidecar was restarted: {sidecar} -> {run(args.sidecar)}")
    ok(f"the sidecar outlived every vLLM restart (still {sidecar})")


def _state(url: str) -> str | None:
    try:
        return status(url).get("state")
    except (OSError, ValueError):
        return None


URL = ""

if __name__ == "__main__":
    main()
