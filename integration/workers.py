"""autosleepd with worker processes (AUTOSLEEPD_WORKERS), in a container or a systemd unit, as a
user sees it (standard library only):

    python3 integration/workers.py URL --token-file F --processes N --stop CMD --exit-code CMD
        [--exec "docker exec -i ID"] [--orphan]

1. the owner and N-1 workers run (its children), and status says N processes;
2. asleep, a burst of requests over fresh connections (so every process accepts some) is held
   and served by one wake;
3. a worker killed with SIGKILL is restarted by the owner, and no dead process is left unreaped;
4. with --orphan: a process orphaned where autosleepd runs (`sh -c 'sleep 0.2 & exit'`) is reaped;
5. --stop: streams in flight finish whole, autosleepd exits 0 (--exit-code prints its status),
   well within the grace period.

--exec runs the process listing and the kills where autosleepd runs (in its container).

Each step prints one line; the first failure exits 1.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time

import shlex

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


def processes(where: str) -> list[tuple[int, int, str, str]]:
    """(pid, parent, state, command) of every process (``where``: the --exec prefix) but this listing."""
    done = subprocess.run([*shlex.split(where), "python3", "-"], input=PS,
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        fail(f"listing the container's processes failed: {done.stderr.strip()[-300:]}")
    rows = [line.split(" ", 3) for line in done.stdout.splitlines()]
    return [(int(pid), int(parent), state, command) for pid, parent, state, command in rows
            if command != "python3 -"]


def workers(where: str) -> list[int]:
    return [pid for pid, _, state, command in processes(where)
            if "autosleepd.workers.worker" in command and state != "Z"]


def zombies(where: str) -> list[tuple]:
    return [row for row in processes(where) if row[2] == "Z"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--exec", default="", help="a prefix that runs a command where autosleepd runs")
    parser.add_argument("--orphan", action="store_true", help="check that an orphan is reaped there")
    parser.add_argument("--stop", required=True, help="stops autosleepd")
    parser.add_argument("--exit-code", required=True, help="prints the stopped autosleepd's exit status")
    parser.add_argument("--token-file", required=True, help="holds the admin token")
    parser.add_argument("--processes", type=int, required=True, help="AUTOSLEEPD_WORKERS")
    parser.add_argument("--burst", type=int, default=48)
    args = parser.parse_args()
    url, container = args.url.rstrip("/"), args.exec
    token = open(args.token_file).read().strip()

    until("every worker has started", lambda: len(workers(container)) == args.processes - 1, 60)
    rows = {row[0]: row for row in processes(container)}
    owners = {rows[pid][1] for pid in workers(container)}
    if len(owners) != 1 or status(url).get("workers", {}).get("processes") != args.processes:
        fail(f"expected one owner and {args.processes - 1} workers: {list(rows.values())}, "
             f"status {status(url).get('workers')}")
    owner = rows[owners.pop()]
    ok(f"the owner (pid {owner[0]}, its parent {owner[1]}: {rows[owner[1]][3] if owner[1] in rows else '-'}) "
       f"and its {args.processes - 1} workers (pids {', '.join(map(str, workers(container)))}) run")

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
    run(f"{container} sh -c 'kill -9 {victim}'")
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

    if args.orphan:
        run(f"{container} sh -c 'sleep 0.2 & exit 0'")
        deadline = time.monotonic() + 10
        while zombies(container) and time.monotonic() < deadline:
            time.sleep(0.2)
        if zombies(container):
            fail(f"a process orphaned where autosleepd runs stays <defunct> (nothing reaps it: is "
                 f"there an init as PID 1?): {zombies(container)}")
        pid1 = [row for row in processes(container) if row[0] == 1][0]
        ok(f"a process orphaned there was reaped (no <defunct> left; PID 1: {pid1[3]})")

    drained_on_stop(url, ["model"], args.stop, args.exit_code, streams=8)


if __name__ == "__main__":
    main()
