"""What a user of a deployment would do, against a running autosleepd (standard library only).

    python3 integration/scenario.py URL --token-file F --restart CMD --crash CMD --sidecar CMD

1. a completion is served;
2. the engine falls asleep after the idle window, and the next completion wakes it;
3. for each of --restart (a planned restart of vLLM) and --crash (vLLM killed; its supervisor
   brings it back): a completion sent while vLLM is down is held, then served by the new engine;
4. the sidecar is the same process all along (--sidecar prints its identity);
5. with --stop (and --exit-code): streams in flight when the sidecar is stopped finish whole,
   and the sidecar exits 0.

two_models.py and workers.py use its steps for the other deployments.

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


def status(url: str, model: str | None = None) -> dict:
    """The sidecar's status; on a host of several engines, that of the one serving ``model``."""
    return call(url, "/autosleepd/status" + (f"?model={model}" if model else ""), timeout=5)[1]


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


def complete(url: str, model: str = "model") -> tuple[int, dict]:
    return call(url, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 4})


def served(answer: tuple[int, dict], model: str = "model") -> bool:
    """A right answer: 200, the prompt's words, from the engine serving ``model``."""
    code, body = answer
    return (code == 200 and body.get("model") == model
            and (body.get("choices") or [{}])[0].get("text") == EXPECTED)


def stream(url: str, model: str, tokens: int) -> tuple[int, int, bool]:
    """A streamed completion of ``tokens`` tokens: (status, tokens received, [DONE] seen)."""
    request = urllib.request.Request(
        url + "/v1/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": model, "prompt": "drained", "max_tokens": tokens, "stream": True}).encode())
    received, done = 0, False
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            for line in response:
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif line.startswith(b"data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    received += 1
            return response.status, received, done
    except urllib.error.HTTPError as error:
        return error.code, received, done
    except OSError:
        return 0, received, done


def run(command: str) -> str:
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        fail(f"{command!r} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


def held_across(url: str, name: str, command: str, model: str = "model", host: bool = False,
                meanwhile=None, load: float = 2.0) -> float:
    """Run ``command`` (it takes vLLM down; the new engine listens ``load`` seconds after it
    returns), send a completion, and see it held, then served; ``meanwhile`` runs while it is
    held. Returns the seconds from the command to the answer."""
    started = time.monotonic()
    run(command)
    returned = time.monotonic()
    result: list = []
    sender = threading.Thread(target=lambda: result.append(complete(url, model)))
    sent = time.monotonic()
    sender.start()
    held = until(f"{name}: the request is held",
                 lambda: status(url, model if host else None).get("queued", 0) >= 1
                 or not sender.is_alive(), 30)
    seen_held = sender.is_alive()
    if seen_held and meanwhile is not None:
        meanwhile()
    sender.join(200)
    answer = result[0] if result else (None, {})
    if not served(answer, model):
        fail(f"{name}: the held request got {answer[0]} {json.dumps(answer[1])[:300]}")
    waited, after, answered = time.monotonic() - started, time.monotonic() - returned, time.monotonic() - sent
    if seen_held:
        how = f"held (seen queued after {held:.2f}s)"
    elif after >= 0.75 * load:
        # Not queued, yet answered only once the new engine listened: it waited in its connect
        # (where Docker's DNS is slow to fail a stopped container's name) and went straight on.
        how = f"waited in its connect to the engine ({after:.1f}s, never queued)"
    else:
        fail(f"{name}: the request was answered {after:.2f}s after the command, before the new "
             f"engine could listen ({load:g}s), and never seen held: was vLLM down?")
    ok(f"{name}: a request sent while vLLM was down {how}, then served 200 with the right "
       f"text after {answered:.1f}s ({waited:.1f}s after the command began)")
    return waited


def drained_on_stop(url: str, models: list[str], stop: str, exit_code: str, host: bool = False,
                    streams: int = 2, tokens: int = 100, bound: float = 15, held: str | None = None,
                    down: str | None = None) -> float:
    """Streams in flight (``streams`` per model, ``tokens`` tokens each) when ``stop`` stops the
    sidecar must finish whole, the sidecar must exit 0 (``exit_code`` prints its exit status),
    and the stop must take under ``bound`` seconds. With ``held`` (a model) and ``down`` (a
    command that stops its engine): requests for it, held meanwhile, must get 503
    shutting_down at once. Returns how long the stop took."""
    refused: list = []
    holders = [threading.Thread(target=lambda: refused.append((complete(url, held), time.monotonic())))
               for _ in range(4 if held else 0)]
    if held:
        run(down)
        for holder in holders:
            holder.start()
        until(f"requests for {held!r} are held while its engine is down",
              lambda: status(url, held if host else None).get("queued", 0) >= len(holders), 30)
    results: list = []
    senders = [threading.Thread(target=lambda m=m: results.append((m, stream(url, m, tokens))))
               for m in models for _ in range(streams)]
    for sender in senders:
        sender.start()
    until("the streams are in flight", lambda: sum(
        status(url, m if host else None).get("in_flight", 0) for m in (models if host else models[:1]))
        >= len(senders), 30)
    started = time.monotonic()
    run(stop)
    took = time.monotonic() - started
    for sender in [*senders, *holders]:
        sender.join(60)
    late = [round(answered - started, 2) for _, answered in refused]
    wrong = [answer for answer, _ in refused
             if answer[0] != 503 or (answer[1].get("error") or {}).get("code") != "shutting_down"]
    if len(refused) != len(holders) or wrong or any(t > 1 for t in late):
        fail(f"held requests at the stop should get 503 shutting_down at once: {wrong[:2]}, after {late}s")
    cut = [(m, r) for m, r in results if r != (200, tokens, True)]
    if cut or len(results) != len(senders):
        fail(f"streams in flight at the stop were cut (model, (status, tokens of {tokens}, [DONE])): {cut}")
    code = run(exit_code)
    if code != "0":
        fail(f"the sidecar exited {code} on stop")
    if took > bound:
        fail(f"the stop took {took:.1f}s (more than {bound:g}s)")
    also = (f"{len(holders)} requests held for {held!r} (its engine stopped) got 503 shutting_down "
            f"within {max(late):.2f}s; " if held else "")
    ok(f"stop: {len(senders)} streams in flight ({tokens} tokens each, to {', '.join(models)}) finished whole; "
       f"{also}the sidecar exited 0; the stop took {took:.1f}s")
    return took


def main() -> None:
    global URL
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--token-file", required=True, help="holds the admin token")
    parser.add_argument("--restart", required=True, help="a planned restart of vLLM")
    parser.add_argument("--crash", help="kills vLLM; its supervisor must bring it back")
    parser.add_argument("--sidecar", required=True, help="prints the sidecar's process identity")
    parser.add_argument("--idle", type=float, default=3.0, help="the sidecar's idle window")
    parser.add_argument("--stop", help="stops the sidecar (last step)")
    parser.add_argument("--exit-code", help="prints the stopped sidecar's exit status")
    args = parser.parse_args()
    URL = url = args.url.rstrip("/")
    token = open(args.token_file).read().strip()

    until("the sidecar has found the engine", lambda: _state(url) in ("awake", "asleep"), 120)
    sidecar = run(args.sidecar)
    ok(f"sidecar up, engine {_state(url)} (sidecar: {sidecar})")
    answer = complete(url)
    if not served(answer):
        fail(f"first completion: {answer}")
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
    if args.stop:
        drained_on_stop(url, ["model"], args.stop, args.exit_code)


def _state(url: str) -> str | None:
    try:
        return status(url).get("state")
    except (OSError, ValueError):
        return None


URL = ""

if __name__ == "__main__":
    main()
