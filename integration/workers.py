"""autosleepd with worker processes (AUTOSLEEPD_WORKERS) in a container, as a user sees it
(standard library only):

    python3 integration/workers.py URL --container ID --token-file F --processes N

1. the container runs the owner and N-1 workers, and status says N processes;
2. asleep, a burst of requests over fresh connections (so every process accepts some) is held
   and served by one wake;
3. a worker killed with SIGKILL (`docker exec ... kill -9`) is restarted by the owner, and no
   dead process is left unreaped in the container;
4. a process orphaned inside the container (`docker exec ... sh -c 'sleep 1 & exit'`) is reaped;
5. `docker stop`: streams in flight finish whole, autosleepd exits 0, well within the grace period.

Each step prints one line; the first failure exits 1.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time

from scenario import call, complete, drained_on_stop, fail, ok, run, served, status, until

# Runs inside the container (python3 is there): pid, parent, state and command of each process.
PS = """
import os
for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode().strip()
    except OSError:
        continue
    fields = stat[stat.rindex(")") + 2:].split()
    print(pid, fields[1], fields[0], cmd or "[" + stat[stat.index("(") + 1:stat.rindex(")")] + "]")
"""


def processes(container: str) -> list[tuple[int, int, str, str]]:
    """(pid, parent, state, command) of every process in the container but this listing."""
    done = subprocess.run(["docker", "exec", "-i", container, "python3", "-"], input=PS,
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        fail(f"listing the container's processes failed: {done.stderr.strip()[-300:]}")
    rows = [line.split(" ", 3) for line in done.stdout.splitlines()]
    return [(int(pid), int(parent), state, command) for pid, parent, state, command in rows
            if command != "python3 -"]


def workers(container: str) -> list[int]:
    return [pid for pid, _, state, command in processes(container)
            if "autosleepd.workers.worker" in command and state != "Z"]


def zombies(container: str) -> list[tuple]:
    return [row for row in processes(container) if row[2] == "Z"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--container", required=True)
    parser.add_argument("--token-file", required=True, help="holds the admin token")
    parser.add_argument("--processes", type=int, required=True, help="AUTOSLEEPD_WORKERS")
    parser.add_argument("--burst", type=int, default=48)
    args = parser.parse_args()
    url, container = args.url.rstrip("/"), args.container
    token = open(args.token_file).read().strip()

    until("every worker has started", lambda: len(workers(container)) == args.processes - 1, 60)
    owner = [row for row in processes(container) if row[3].endswith("bin/autosleepd")]
    if len(owner) != 1 or status(url).get("workers", {}).get("processes") != args.processes:
        fail(f"expected one owner and {args.processes - 1} workers: {processes(container)}, "
             f"status {status(url).get('workers')}")
    ok(f"the owner (pid {owner[0][0]} in the container, its parent {owner[0][1]}) and "
       f"{args.processes - 1} workers (pids {', '.join(map(str, workers(container)))}) run")

    code, _ = call(url, "/autosleepd/sleep", token=token, method="POST")
    if code != 200 or status(url)["state"] != "asleep":
        fail(f"a manual sleep got {code}, state {status(url)['state']}")
    wakes = status(url)["wakes"]
    answers: list = []
    senders = [threading.Thread(target=lambda: answers.append(complete(url))) for _ in range(args.burst)]
    started = time.monotonic()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(120)
    took = time.monotonic() - started
    wrong = [answer for answer in answers if not served(answer)]
    if wrong or len(answers) != args.burst or status(url)["wakes"] != wakes + 1:
        fail(f"a burst of {args.burst} while asleep: {len(answers)} answers, {len(wrong)} wrong "
             f"({wrong[:2]}), wakes {wakes} -> {status(url)['wakes']}")
    ok(f"asleep, a burst of {args.burst} requests on fresh connections: all served right by one wake, "
       f"the last after {took:.2f}s")

    before, exits = workers(container), status(url)["workers"]["exits"]
    victim = before[0]
    run(f"docker exec {container} sh -c 'kill -9 {victim}'")
    restarted = until("the killed worker is restarted", lambda: status(url)["workers"]["exits"] == exits + 1
                      and len(workers(container)) == args.processes - 1 and victim not in workers(container), 30)
    left = zombies(container)
    if left:
        fail(f"after a worker was killed, dead processes are left unreaped: {left}")
    answers = [complete(url) for _ in range(8)]
    if not all(served(answer) for answer in answers):
        fail(f"after a worker was restarted, requests got {[a[0] for a in answers]}")
    ok(f"a worker killed with SIGKILL (pid {victim}) was restarted in {restarted:.1f}s "
       f"(workers {before} -> {workers(container)}); nothing left <defunct>; requests served")

    run(f"docker exec {container} sh -c 'sleep 0.2 & exit 0'")
    deadline = time.monotonic() + 10
    while zombies(container) and time.monotonic() < deadline:
        time.sleep(0.2)
    if zombies(container):
        fail(f"a process orphaned in the container stays <defunct> (nothing reaps it: is there "
             f"an init as PID 1?): {zombies(container)}")
    pid1 = [row for row in processes(container) if row[0] == 1][0]
    ok(f"a process orphaned in the container was reaped (no <defunct> left; PID 1: {pid1[3]})")

    drained_on_stop(url, ["model"], f"docker stop -t 45 {container}",
                    f"docker inspect -f '{{{{.State.ExitCode}}}}' {container}", streams=8)


if __name__ == "__main__":
    main()
